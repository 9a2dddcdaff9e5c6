"""Quantization primitives: per-tensor and blockwise (plain or transposed).

quantize_tensor_p:  x [G, L] float -> (q [G, L] fp8, scale [G] f32); one scale per row g.
quantize_block_p:   x [B, R, C] float -> (q, scales): q is x, or x transposed to [B, C, R],
                    quantized in block_rows x block_cols blocks of q's own layout;
                    scales [B, ceil(rows(q) / block_rows), ceil(cols(q) / block_cols)].
quantize_dual_p:    x [B, R, C] float -> (q [B, R, C], scales [B, R, ceil(C / bs)],
                    qt [B, C, R], scales_t [B, C, ceil(R / bs)]): both 1 x bs layouts
                    (rows, and transposed) from one read of x; each equals quantize_block_p's.

scale = max(amax, 1e-12) / max_finite(dtype); q = saturate(round_to_nearest_even(x / scale)).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.interpreters import batching

from .. import _ffi
from .._dtypes import BLOCK_SIZES
from . import _common as c

# ---------------------------------------------------------------------------------------
quantize_tensor_p = c.make_primitive("quantize_tensor", multiple_results=True)


def _tensor_abstract_eval(x, *, dtype):
    c.check_float("x", x)
    c.check_rank("x", x, 2, "[groups, length]")
    return c.shaped(x.shape, dtype), c.shaped(x.shape[:1], jnp.float32)


def _tensor_batch(args, dims, *, dtype):
    (x,), (d,) = args, dims
    size = x.shape[d]
    q, s = quantize_tensor_p.bind(c.fold_into_batch(x, d, size), dtype=dtype)
    return (c.split_leading(q, size), c.split_leading(s, size)), (0, 0)


quantize_tensor_p.def_abstract_eval(_tensor_abstract_eval)
batching.primitive_batchers[quantize_tensor_p] = _tensor_batch
_ffi.register_lowering(quantize_tensor_p, "quantize_tensor", lambda dtype: {})


def quantize_tensor(x, dtype):
    return quantize_tensor_p.bind(x, dtype=jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------
quantize_block_p = c.make_primitive("quantize_block", multiple_results=True)


def block_out_shapes(shape, block_rows, block_cols, transpose):
    b, r, cols = shape
    if transpose:
        r, cols = cols, r
    return (b, r, cols), (b, c.cdiv(r, block_rows), c.cdiv(cols, block_cols))


def _block_abstract_eval(x, *, dtype, block_rows, block_cols, transpose):
    c.check_float("x", x)
    c.check_rank("x", x, 3, "[batch, rows, cols]")
    if block_cols not in BLOCK_SIZES or block_rows not in (1, block_cols):
        raise ValueError(
            f"block shape must be (1, b) or (b, b) with b in {BLOCK_SIZES}, "
            f"got ({block_rows}, {block_cols})")
    q_shape, s_shape = block_out_shapes(x.shape, block_rows, block_cols, transpose)
    return c.shaped(q_shape, dtype), c.shaped(s_shape, jnp.float32)


def _block_batch(args, dims, **params):
    (x,), (d,) = args, dims
    size = x.shape[d]
    q, s = quantize_block_p.bind(c.fold_into_batch(x, d, size), **params)
    return (c.split_leading(q, size), c.split_leading(s, size)), (0, 0)


quantize_block_p.def_abstract_eval(_block_abstract_eval)
batching.primitive_batchers[quantize_block_p] = _block_batch
_ffi.register_lowering(
    quantize_block_p, "quantize_block",
    lambda dtype, block_rows, block_cols, transpose: dict(
        block_rows=int(block_rows), block_cols=int(block_cols), transpose=bool(transpose)))


def quantize_block(x, dtype, block_rows, block_cols, transpose=False):
    return quantize_block_p.bind(x, dtype=jnp.dtype(dtype), block_rows=int(block_rows),
                                 block_cols=int(block_cols), transpose=bool(transpose))


# ---------------------------------------------------------------------------------------
quantize_dual_p = c.make_primitive("quantize_dual", multiple_results=True)


def _dual_abstract_eval(x, *, dtype, block_size):
    c.check_float("x", x)
    c.check_rank("x", x, 3, "[batch, rows, cols]")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    b, r, cols = x.shape
    return (c.shaped((b, r, cols), dtype), c.shaped((b, r, c.cdiv(cols, block_size)), jnp.float32),
            c.shaped((b, cols, r), dtype), c.shaped((b, cols, c.cdiv(r, block_size)), jnp.float32))


def _dual_batch(args, dims, **params):
    (x,), (d,) = args, dims
    size = x.shape[d]
    outs = quantize_dual_p.bind(c.fold_into_batch(x, d, size), **params)
    return tuple(c.split_leading(o, size) for o in outs), (0,) * 4


quantize_dual_p.def_abstract_eval(_dual_abstract_eval)
batching.primitive_batchers[quantize_dual_p] = _dual_batch
_ffi.register_lowering(quantize_dual_p, "quantize_dual",
                       lambda dtype, block_size: dict(block_size=int(block_size)))


def quantize_dual(x, dtype, block_size):
    return quantize_dual_p.bind(x, dtype=jnp.dtype(dtype), block_size=int(block_size))
