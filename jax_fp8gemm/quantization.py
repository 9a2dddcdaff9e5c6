"""Quantization to FP8: per-tensor and fine-grained (blockwise) scaling.

Every function returns FP8 values `q` and float32 `scale(s)` with x ~= q * scale, where
a block's scale = max(amax(|x|), 1e-12) / max_finite(dtype) and q = x * (max_finite(dtype) /
max(amax(|x|), 1e-12)) (one float32 reciprocal per block, as DeepGEMM's x * (448 / amax))
rounded to nearest even and saturated to the format's finite range. inf/NaN policy: a NaN or inf in
a block makes that block's scale NaN or inf, and every value dequantized from the block
(and every GEMM output that reads it) NaN; other blocks are unaffected.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from . import _dtypes
from .primitives.quantize import quantize_block, quantize_dual, quantize_tensor

__all__ = ["quantize_fp8", "quantize_fp8_fine_grained", "quantize_fp8_with_transpose",
           "compute_scales", "dequantize"]


def quantize_fp8(x, dtype="e4m3"):
    """Per-tensor quantization: returns (x_fp8, scale), scale a float32 scalar.

    >>> a_fp8, scale_a = quantize_fp8(a, dtype="e4m3")
    """
    fp8 = _dtypes.fp8_dtype(dtype)
    x = _dtypes.float_array(x, "x")
    q, scale = quantize_tensor(x.reshape(1, x.size), fp8)
    return q.reshape(x.shape), scale[0]


def _block_shape(block_size, block_shape):
    if block_shape is None:
        return 1, _dtypes.block_size(block_size)
    try:
        rows, cols = (int(v) for v in block_shape)
    except (TypeError, ValueError):
        raise ValueError(f"block_shape must be a pair like (1, 128) or (128, 128), got {block_shape!r}")
    _dtypes.block_size(cols, "block_shape[1]")
    if rows not in (1, cols):
        raise ValueError(
            f"block_shape must be (1, b) for activations or (b, b) for weights, got {block_shape!r}")
    return rows, cols


def quantize_fp8_fine_grained(x, block_size=128, dtype="e4m3", *, block_shape=None,
                              transpose=False):
    """Fine-grained quantization: returns (x_fp8, scales).

    Default blocks are 1 x block_size along the last axis (activations): x [..., M, K] gives
    scales [..., M, ceil(K / block_size)]. `block_shape=(bs, bs)` quantizes each trailing
    matrix in bs x bs blocks (weights): x [..., R, C] gives scales [..., ceil(R/bs),
    ceil(C/bs)]. block_size is 64, 128 or 256; a last partial block gets its own scale.

    transpose=True returns the last two axes swapped and quantized in blocks of that
    transposed layout, in one pass over x: x [..., M, K] gives x_fp8 [..., K, M] with
    scales [..., K, ceil(M / bs)] (what the weight gradient dW = X^T dY reads).
    """
    rows_b, cols_b = _block_shape(block_size, block_shape)
    fp8 = _dtypes.fp8_dtype(dtype)
    x = _dtypes.float_array(x, "x")
    min_rank = 1 if rows_b == 1 and not transpose else 2
    if x.ndim < min_rank:
        raise ValueError(f"x must have at least {min_rank} dimension(s), got shape {x.shape}")
    if rows_b == 1 and not transpose:
        # Rows are independent: every leading axis folds into one row axis.
        x3 = x.reshape(1, math.prod(x.shape[:-1]), x.shape[-1])
        q, s = quantize_block(x3, fp8, rows_b, cols_b)
        return q.reshape(x.shape), s.reshape(x.shape[:-1] + s.shape[-1:])
    lead = x.shape[:-2]
    x3 = x.reshape((math.prod(lead),) + x.shape[-2:])
    q, s = quantize_block(x3, fp8, rows_b, cols_b, transpose)
    return q.reshape(lead + q.shape[1:]), s.reshape(lead + s.shape[1:])


def quantize_fp8_with_transpose(x, block_size=128, dtype="e4m3"):
    """Both 1 x block_size layouts of x [..., M, K] from one read of x (what FP8 training
    needs of every activation and output gradient): returns (x_fp8, scales, xt_fp8,
    scales_t), where (x_fp8, scales) equals quantize_fp8_fine_grained(x, block_size, dtype)
    and (xt_fp8 [..., K, M], scales_t [..., K, ceil(M / block_size)]) equals it with
    transpose=True, bit for bit.
    """
    bs = _dtypes.block_size(block_size)
    fp8 = _dtypes.fp8_dtype(dtype)
    x = _dtypes.float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions, got shape {x.shape}")
    lead = x.shape[:-2]
    outs = quantize_dual(x.reshape((math.prod(lead),) + x.shape[-2:]), fp8, bs)
    return tuple(o.reshape(lead + o.shape[1:]) for o in outs)


def compute_scales(x, block_size=128, dtype="e4m3", *, block_shape=None):
    """The scales quantize_fp8_fine_grained would return, alone (same rules, same values)."""
    return quantize_fp8_fine_grained(x, block_size, dtype, block_shape=block_shape)[1]


def dequantize(x_fp8, scales, block_size=128):
    """Back to float32: x_fp8 * scale, the scale broadcast over its block.

    The block shape follows from the scales' shape: a scalar (or single-element) scale is
    per-tensor; scales [..., R, ceil(C/bs)] are 1 x bs blocks and [..., ceil(R/bs),
    ceil(C/bs)] are bs x bs blocks of x_fp8 [..., R, C].
    """
    x_fp8 = _dtypes.fp8_array(x_fp8, "x_fp8")
    scales = _dtypes.f32_array(scales, "scales")
    x = x_fp8.astype(jnp.float32)
    if scales.size == 1 and scales.ndim <= 1:
        return x * scales.reshape(())
    bs = _dtypes.block_size(block_size)
    rows = x.shape[-2] if x.ndim >= 2 else 1
    cols = x.shape[-1]
    lead = x.shape[:-2] if x.ndim >= 2 else ()
    kb = -(-cols // bs)
    if x.ndim >= 2 and scales.shape == lead + (rows, kb):
        block_rows = 1
    elif x.ndim >= 2 and scales.shape == lead + (-(-rows // bs), kb):
        block_rows = bs
    elif x.ndim == 1 and scales.shape == (kb,):
        block_rows = 1
    else:
        raise ValueError(
            f"scales has shape {scales.shape}, which matches no block layout of x_fp8 "
            f"{x_fp8.shape} with block_size {bs}: expected {lead + (rows, kb)} (1 x {bs}) or "
            f"{lead + (-(-rows // bs), kb)} ({bs} x {bs})")
    s = jnp.repeat(scales, bs, axis=-1)[..., :cols]
    if x.ndim >= 2:
        s = jnp.repeat(s, block_rows, axis=-2)[..., :rows, :]
    return x * s
