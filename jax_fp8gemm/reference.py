"""The test oracle: numpy implementations of every op, independent of the kernels.

Quantization follows the library's rules exactly (float32 arithmetic, ml_dtypes casts), so
its scales and FP8 values can be compared bit for bit. GEMMs multiply the dequantized FP8
inputs in float64.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8 = {"e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "e5m2": (ml_dtypes.float8_e5m2, 57344.0)}
AMAX_FLOOR = np.float32(1e-12)


def _fmt(dtype):
    if isinstance(dtype, str):
        return FP8[dtype]
    name = {np.dtype(ml_dtypes.float8_e4m3fn): "e4m3", np.dtype(ml_dtypes.float8_e5m2): "e5m2"}
    return FP8[name[np.dtype(dtype)]]


def _cast(x32, amax, dtype):
    """x * (max_finite / max(amax, floor)), rounded to nearest even, saturated to the finite
    range."""
    t, mx = _fmt(dtype)
    amax = np.asarray(amax, np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        inv = np.float32(mx) / np.where(amax < AMAX_FLOOR, AMAX_FLOOR, amax)
        v = (x32 * inv).astype(np.float32)
    return np.clip(v, -mx, mx).astype(t)  # clip keeps NaN


def _scale(amax, dtype):
    _, mx = _fmt(dtype)
    amax = np.asarray(amax, np.float32)
    return np.where(amax < AMAX_FLOOR, AMAX_FLOOR, amax) / np.float32(mx)


def _amax(x32, axis=None, keepdims=False):
    a = np.abs(x32)
    return np.max(a, axis=axis, keepdims=keepdims)  # np.max propagates NaN


def quantize_tensor(x, dtype="e4m3"):
    x32 = np.asarray(x, np.float32)
    amax = _amax(x32)
    return _cast(x32, amax, dtype), np.float32(_scale(amax, dtype))


def quantize_blocks(x, block_rows, block_cols, dtype="e4m3"):
    """x [R, C] -> (q [R, C], scales [ceil(R/br), ceil(C/bc)])."""
    x32 = np.asarray(x, np.float32)
    r, c = x32.shape
    sr, sc = -(-r // block_rows), -(-c // block_cols)
    scales = np.empty((sr, sc), np.float32)
    q = np.empty((r, c), _fmt(dtype)[0])
    for i in range(sr):
        for j in range(sc):
            blk = x32[i * block_rows:(i + 1) * block_rows, j * block_cols:(j + 1) * block_cols]
            amax = _amax(blk)
            scales[i, j] = _scale(amax, dtype)
            q[i * block_rows:(i + 1) * block_rows, j * block_cols:(j + 1) * block_cols] = _cast(blk, amax, dtype)
    return q, scales


def quantize_rows(x, block, dtype="e4m3"):
    """1 x block along the last axis, vectorized: x [..., C] -> (q, scales [..., ceil(C/b)])."""
    x32 = np.asarray(x, np.float32)
    c = x32.shape[-1]
    nb = -(-c // block)
    pad = np.zeros(x32.shape[:-1] + (nb * block - c,), np.float32)
    blocks = np.concatenate([x32, pad], -1).reshape(x32.shape[:-1] + (nb, block))
    amax = _amax(blocks, axis=-1)
    s = _scale(amax, dtype).astype(np.float32)
    q = _cast(blocks, amax[..., None], dtype).reshape(x32.shape[:-1] + (nb * block,))[..., :c]
    return q, s


def dequantize(q, scales, block_rows, block_cols):
    """FP8 [R, C] with block scales -> float64."""
    x = np.asarray(q).astype(np.float64)
    s = np.repeat(np.repeat(np.asarray(scales, np.float64), block_rows, 0), block_cols, 1)
    return x * s[: x.shape[0], : x.shape[1]]


def gemm(a, b_nk, scale_a, scale_b, scale_mode, block=128):
    """float64 product of the dequantized operands: a [M, K], b [N, K] -> [M, N]."""
    if scale_mode == "tensor":
        da = np.asarray(a).astype(np.float64) * float(np.asarray(scale_a).reshape(-1)[0])
        db = np.asarray(b_nk).astype(np.float64) * float(np.asarray(scale_b).reshape(-1)[0])
    else:
        da = dequantize(a, scale_a, 1, block)
        db = dequantize(b_nk, scale_b, block if scale_mode == "block" else 1, block)
    return da @ db.T


def group_ranges(sizes, rows):
    """[(begin, end)] per group, with the library's clamping policy."""
    out, offset = [], 0
    for s in np.asarray(sizes).tolist():
        s = max(int(s), 0)
        out.append((min(offset, rows), min(offset + s, rows)))
        offset += s
    return out


def calc_diff(x, y):
    """DeepGEMM's accuracy metric: 1 - 2 sum(xy) / sum(x^2 + y^2) (0 is identical)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom else 0.0
