"""Helpers shared by the primitive definitions: creation, shape checks, batching."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from .. import _compat
from .._dtypes import FLOAT_INPUTS, FP8_DTYPES, OUT_DTYPES

not_mapped = _compat.not_mapped

# Values of the FFI attribute `scale_mode` (csrc/common/problem.h ScaleMode).
SCALE_MODES = {"tensor": 0, "block": 1, "row": 2}


def make_primitive(name: str, *, multiple_results: bool = False) -> Primitive:
    prim = Primitive(f"jax_fp8gemm_{name}")
    prim.multiple_results = multiple_results
    prim.def_impl(functools.partial(_compat.apply_primitive, prim))
    return prim


def bind_with_k_padded(prim, operands, k_operands, **params):
    """prim.bind(*operands, **params), with the operands at k_operands (which share their
    last axis, K) padded by zeros to a multiple of 16 along it.

    The Hopper kernel loads K-major rows by TMA, whose row pitch must be a multiple of 16
    bytes; other K ran on the portable kernel (13 TFLOP/s at 2049^3). The zeros add nothing
    to any K block's sum and never start a new block (block sizes are multiples of 16), so
    the scales keep their shapes. The call is first checked as given, so that an error
    names the caller's shapes.
    """
    ks = {jnp.shape(operands[i])[-1] if jnp.ndim(operands[i]) else None for i in k_operands}
    k = ks.pop() if len(ks) == 1 else None  # K's that differ are the abstract eval's to report
    if k is None or k % 16 == 0:
        return prim.bind(*operands, **params)
    jax.eval_shape(functools.partial(prim.bind, **params), *operands)
    pad = -k % 16
    operands = [jnp.pad(x, [(0, 0)] * (jnp.ndim(x) - 1) + [(0, pad)]) if i in k_operands else x
                for i, x in enumerate(operands)]
    return prim.bind(*operands, **params)


def shaped(shape, dtype):
    return _compat.ShapedArray(tuple(int(d) for d in shape), jnp.dtype(dtype))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------
# Checks: each raises with the argument's name, what it got and what was expected.

def check_fp8(name, aval):
    if aval.dtype not in FP8_DTYPES:
        raise TypeError(f"{name} must be float8_e4m3fn or float8_e5m2, got {aval.dtype}")


def check_float(name, aval):
    if aval.dtype not in FLOAT_INPUTS:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {aval.dtype}")


def check_f32(name, aval):
    if aval.dtype != jnp.float32:
        raise TypeError(f"{name} must be float32, got {aval.dtype}")


def check_int32(name, aval):
    if aval.dtype != jnp.int32:
        raise TypeError(f"{name} must be int32, got {aval.dtype}")


def check_out(dtype):
    if jnp.dtype(dtype) not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16 or float32, got {dtype}")


def check_shape(name, aval, expected, what=""):
    expected = tuple(int(d) for d in expected)
    if tuple(aval.shape) != expected:
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} has shape {tuple(aval.shape)}, expected {expected}{hint}")


def check_rank(name, aval, rank, what):
    if aval.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} ({what}), got shape {tuple(aval.shape)}")


# ---------------------------------------------------------------------------------------
# Batching: the primitives that take a leading batch axis absorb a vmapped axis into it.

def move_to_front(x, dim, size):
    """x with its vmapped axis first, broadcasting an unmapped operand to `size`."""
    if dim is not_mapped:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, dim, 0)


def merge_leading(x):
    """[V, B, ...] -> [V * B, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def fold_into_batch(x, dim, size):
    """Folds a vmapped axis into the operand's own leading batch axis."""
    return merge_leading(move_to_front(x, dim, size))


def fold_weights(operands, dims, size, batch):
    """Folds the vmapped axis into weight-side operands whose leading axis is 1 (shared by
    every batch entry) or `batch`. They stay shared when none of them is vmapped and they
    are shared; otherwise each becomes [size * batch, ...]."""
    if all(d is not_mapped for d in dims) and all(x.shape[0] == 1 for x in operands):
        return list(operands)
    out = []
    for x, d in zip(operands, dims):
        x = move_to_front(x, d, size)
        x = jnp.broadcast_to(x, (size, batch) + x.shape[2:])
        out.append(merge_leading(x))
    return out


def unmapped_shape(x, dim):
    """The shape of one batch entry of x."""
    return tuple(d for i, d in enumerate(x.shape) if dim is not_mapped or i != dim)


def mapped_size(args, dims):
    return next(x.shape[d] for x, d in zip(args, dims) if d is not not_mapped)


def split_leading(x, size):
    """[V * B, ...] -> [V, B, ...]."""
    return x.reshape((size, x.shape[0] // size) + x.shape[1:])


def numel(shape) -> int:
    return math.prod(int(d) for d in shape)
