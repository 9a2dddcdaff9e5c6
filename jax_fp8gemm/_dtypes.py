"""The FP8 formats and output dtypes the library accepts: one table for every op."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# name -> (dtype, largest finite value). e4m3fn has no infinities; e5m2 is IEEE-like.
FP8_FORMATS = {
    "e4m3": (jnp.dtype(jnp.float8_e4m3fn), 448.0),
    "e5m2": (jnp.dtype(jnp.float8_e5m2), 57344.0),
}
FP8_DTYPES = tuple(d for d, _ in FP8_FORMATS.values())
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
FLOAT_INPUTS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_SIZES = (64, 128, 256)
AMAX_FLOOR = np.float32(1e-12)  # csrc/common/fp8.h kAmaxFloor


def fp8_dtype(dtype) -> jnp.dtype:
    """Parses "e4m3", "e5m2", jnp.float8_e4m3fn or jnp.float8_e5m2; ValueError otherwise."""
    if isinstance(dtype, str):
        if dtype in FP8_FORMATS:
            return FP8_FORMATS[dtype][0]
    else:
        try:
            d = jnp.dtype(dtype)
        except TypeError:
            d = None
        if d in FP8_DTYPES:
            return d
    raise ValueError(
        f"dtype must be 'e4m3', 'e5m2', jnp.float8_e4m3fn or jnp.float8_e5m2, got {dtype!r}")


def max_finite(dtype) -> float:
    d = fp8_dtype(dtype)
    return next(m for t, m in FP8_FORMATS.values() if t == d)


def out_dtype(dtype, name: str = "out_dtype") -> jnp.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d not in OUT_DTYPES:
        raise ValueError(f"{name} must be jnp.bfloat16 or jnp.float32, got {dtype!r}")
    return d


def block_size(value, name: str = "block_size") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {BLOCK_SIZES}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------
# Argument checks of the public API: each returns the argument as an array or raises with
# its name, what it got and what was expected.

def fp8_array(x, name: str):
    x = jnp.asarray(x)
    if x.dtype not in FP8_DTYPES:
        raise TypeError(
            f"{name} must be float8_e4m3fn or float8_e5m2 (quantize it first, e.g. with "
            f"quantize_fp8), got {x.dtype}")
    return x


def f32_array(x, name: str):
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    return x


def float_array(x, name: str):
    x = jnp.asarray(x)
    if x.dtype not in FLOAT_INPUTS:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def group_sizes(sizes, name: str, groups: int):
    """An integer vector with one entry per group, as int32 (the kernels' type)."""
    sizes = jnp.asarray(sizes)
    if not jnp.issubdtype(sizes.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {sizes.dtype}")
    if sizes.shape != (groups,):
        raise ValueError(f"{name} has shape {sizes.shape}, expected ({groups},) (one per group)")
    return sizes.astype(jnp.int32)
