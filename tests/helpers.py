"""Input generation, quantization through the public API, and the float64 references the
tests compare against (built on jax_fp8gemm.reference, the numpy oracle)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jax_fp8gemm as fg
from jax_fp8gemm import reference

FORMATS = ("e4m3", "e5m2")
BLOCK_SIZES = (64, 128, 256)
NP_FLOAT = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
OUT_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
MANTISSA_BITS = {"e4m3": 3, "e5m2": 2}
MIN_NORMAL = {"e4m3": 2.0 ** -6, "e5m2": 2.0 ** -14}
TINY = float(np.finfo(np.float32).tiny)

# Error of a float32 GEMM relative to sum_k |a_k b_k| (see assert_gemm_close).
F32_ACC_RTOL = 1e-5
# Hopper's FP8 tensor cores (wgmma) accumulate a K block with about 14 significant bits
# before the kernel promotes the block into float32 (DeepSeek-V3 report, section 3.3.2): the
# products of a k32 step are aligned to the largest one and cut to that precision, so when
# one product dominates a step, the cut-off bits of the other 31 add up. 2000 GPU fuzz cases
# saw up to 2^-11.6 of sum |a_k b_k| (an outlier row, e5m2 x e4m3); 2^-10 leaves a margin.
TENSOR_CORE_RTOL = 2.0 ** -10
BF16_RTOL = 2.0 ** -8


# ---------------------------------------------------------------------------------------
# Inputs.

def randn(rng, shape, scale=1.0, dtype=np.float32, outliers=True):
    """Standard normal * scale, with about one value in 1024 made 4-16x larger: outliers
    make the blocks' scales differ, which is what fine-grained scaling is for. (Heavier
    outliers would carry most of a dot product's energy in a few values, and calc_diff
    would then measure the rounding of those few.)"""
    x = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        x *= np.float32(scale)
    if outliers and x.size:
        count = max(1, x.size // 1024)
        idx = rng.integers(0, x.size, count)
        x.reshape(-1)[idx] *= rng.uniform(4, 16, count).astype(np.float32)
    return x.astype(dtype, copy=False)


def on(device, *arrays):
    """The arrays committed to `device`."""
    out = tuple(jax.device_put(x, device) for x in arrays)
    return out[0] if len(out) == 1 else out


def bits(q):
    return np.asarray(q).view(np.uint8)


def assert_fp8_equal(q, expected):
    """FP8 arrays bit-identical, except that any NaN matches any NaN."""
    q, expected = np.asarray(q), np.asarray(expected)
    assert q.dtype == expected.dtype, (q.dtype, expected.dtype)
    assert q.shape == expected.shape, (q.shape, expected.shape)
    nan_q = np.isnan(q.astype(np.float32))
    nan_e = np.isnan(expected.astype(np.float32))
    np.testing.assert_array_equal(nan_q, nan_e, err_msg="NaN positions differ")
    np.testing.assert_array_equal(np.where(nan_q, 0, bits(q)), np.where(nan_e, 0, bits(expected)))


# ---------------------------------------------------------------------------------------
# Fast float64 dequantization (an FP8 byte -> float64 table) for the large GEMM references;
# test_gemm checks it against reference.gemm.

_TABLES = {
    np.dtype(t): np.arange(256, dtype=np.uint8).view(t).astype(np.float64)
    for t in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
}


def fp8_values(q):
    q = np.asarray(q)
    return _TABLES[q.dtype][q.view(np.uint8)]


def dequant(q, scales, block_rows, block_cols):
    """q [R, C] FP8 with scales [ceil(R/br), ceil(C/bc)] (or a scalar) -> float64."""
    x = fp8_values(q)
    s = np.asarray(scales, np.float64)
    if s.size == 1:
        return x * s.reshape(())
    s = np.repeat(np.repeat(s, block_rows, 0), block_cols, 1)
    return x * s[: x.shape[0], : x.shape[1]]


# ---------------------------------------------------------------------------------------
# GEMM operands through the public API, and the reference product.

def quantize_a(a, mode, block_size=128, fmt="e4m3"):
    """a [..., M, K] -> (a_fp8, scales) for fp8_gemm ("tensor") or fp8_gemm_fine_grained."""
    if mode == "tensor":
        return fg.quantize_fp8(a, fmt)
    return fg.quantize_fp8_fine_grained(a, block_size, fmt)


def quantize_b(b_kn, mode, layout, block_size=128, fmt="e4m3"):
    """b [K, N] -> (b_fp8, scales_b) as the GEMMs take them for `layout`, plus
    (q_nk, s_nk): the same values in numpy, K-major, for reference_product."""
    if mode == "tensor":
        q, s = fg.quantize_fp8(b_kn, fmt)
        q_nk, s_nk = q.T, s
    elif mode == "block":
        q, s = fg.quantize_fp8_fine_grained(b_kn, block_size, fmt, block_shape=(block_size, block_size))
        q_nk, s_nk = q.T, s.T
    else:  # row: 1 x bs along K for every column of b, i.e. every row of b^T
        q_nk, s_nk = fg.quantize_fp8_fine_grained(b_kn, block_size, fmt, transpose=True)
        q, s = q_nk.T, s_nk.T
    b, sb = (q, s) if layout == "kn" else (q_nk, s_nk)
    return b, sb, np.ascontiguousarray(np.asarray(q_nk)), np.asarray(s_nk)


def _scale_rows_inplace(x, row_scales, block):
    """x [R, C] *= row_scales [R, ceil(C/block)], each scale over its 1 x block run."""
    c = x.shape[1]
    full = c // block
    if full:
        x[:, : full * block].reshape(x.shape[0], full, block)[...] *= row_scales[:, :full, None]
    if c % block:
        x[:, full * block:] *= row_scales[:, full:full + 1]


def reference_product(qa, sa, qb_nk, sb_nk, mode, block_size=128, chunk=2048):
    """float64 (a_deq @ b_deq^T, |a_deq| @ |b_deq|^T) of a [M, K] and b [N, K] FP8, the
    latter a bound on the size of the rounding errors. b is dequantized a chunk of rows at
    a time: all of a 7168 x 16384 weight would take 1 GB of float64."""
    qa = np.asarray(qa)
    sa, sb_nk = np.asarray(sa, np.float64), np.asarray(sb_nk, np.float64)
    qb_nk = np.asarray(qb_nk)
    da = dequant(qa, sa, 1, block_size)
    abs_da = np.abs(da)
    n, k = qb_nk.shape
    table = _TABLES[qb_nk.dtype]
    ref = np.empty((qa.shape[0], n))
    absprod = np.empty((qa.shape[0], n))
    for r0 in range(0, n, chunk):  # chunk is a multiple of every block size
        r1 = min(n, r0 + chunk)
        db = table[qb_nk[r0:r1].view(np.uint8)]
        if mode == "tensor":
            db *= sb_nk.reshape(())
        elif mode == "block":
            rows = np.repeat(sb_nk[r0 // block_size: -(-r1 // block_size)], block_size, 0)
            _scale_rows_inplace(db, rows[: r1 - r0], block_size)
        else:
            _scale_rows_inplace(db, sb_nk[r0:r1], block_size)
        ref[:, r0:r1] = da @ db.T
        np.abs(db, out=db)
        absprod[:, r0:r1] = abs_da @ db.T
    return ref, absprod


def on_tensor_cores(x=None):
    """Whether x (a jax array; otherwise whatever the test computes on its default device)
    was computed on a GPU where the Hopper (wgmma) kernels run."""
    import os

    import jax_fp8gemm
    if hasattr(x, "devices"):
        devices = x.devices()
    else:
        devices = [jax.config.jax_default_device or jax.devices()[0]]
    return (any(d.platform == "gpu" for d in devices) and jax_fp8gemm.has_fp8_support()
            and os.environ.get("JAX_FP8GEMM_PORTABLE_KERNELS") != "1")


def assert_gemm_close(out, ref, absprod, accumulator=None):
    """Every element of out within the rounding bound of the exact product `ref`.

    A float32 GEMM (products of FP8 values are exact in float32, summed in float32 within a
    K block, then scaled into a float32 accumulator over at most K/bs blocks) is off by at
    most ~(bs/8 + K/bs) * 2^-24 * sum_k |a_k b_k| < 1e-5 * (|a| @ |b|^T) for every K used
    here (TENSOR_CORE_RTOL on Hopper's tensor cores). Adding an accumulator rounds once more
    (2^-24 of the result, taken as 2^-23 of |acc| + |ref|). A bfloat16 output then rounds to 8 significant bits: 2^-8 relative.
    """
    rtol = TENSOR_CORE_RTOL if on_tensor_cores(out) else F32_ACC_RTOL
    out64 = np.asarray(out).astype(np.float64)
    assert out64.shape == ref.shape, (out64.shape, ref.shape)
    assert np.isfinite(out64).all(), "non-finite output"
    bound = rtol * absprod + TINY
    if accumulator is not None:
        acc = np.asarray(accumulator, np.float64)
        ref = ref + acc
        bound = bound + 2.0 ** -23 * (np.abs(acc) + np.abs(ref))
    if np.asarray(out).dtype == jnp.bfloat16:
        bound = (1 + BF16_RTOL) * bound + BF16_RTOL * np.abs(ref)
    err = np.abs(out64 - ref)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / bound, 0)), err.shape)
        raise AssertionError(
            f"{bad.sum()} of {bad.size} elements outside the bound; worst at {i}: out "
            f"{out64[i]!r}, reference {ref[i]!r}, error {err[i]:.3e} > bound {bound[i]:.3e}")


def calc_diff(x, y):
    return reference.calc_diff(np.asarray(x, np.float64), np.asarray(y, np.float64))


# ---------------------------------------------------------------------------------------
# Grouped GEMMs.

def grouped_reference(qx, sx, qw_nk, sw_nk, sizes, mode, block_size=128):
    """Per-group loop of reference_product over reference.group_ranges: rows outside every
    group stay 0. Per-tensor sx and sw are [G]; block sx is [M, kb], sw [G, nb, kb]."""
    qx, sx = np.asarray(qx), np.asarray(sx)
    qw_nk, sw_nk = np.asarray(qw_nk), np.asarray(sw_nk)
    m, n = qx.shape[0], qw_nk.shape[1]
    ref, absprod = np.zeros((m, n)), np.zeros((m, n))
    for g, (lo, hi) in enumerate(reference.group_ranges(sizes, m)):
        if hi > lo:
            sxg = sx[g] if mode == "tensor" else sx[lo:hi]
            ref[lo:hi], absprod[lo:hi] = reference_product(
                qx[lo:hi], sxg, qw_nk[g], sw_nk[g], mode, block_size)
    return ref, absprod


def rows_in_groups(sizes, m):
    """Boolean [m]: rows that belong to some group under the library's clamping policy."""
    mask = np.zeros(m, bool)
    for lo, hi in reference.group_ranges(sizes, m):
        mask[lo:hi] = True
    return mask
