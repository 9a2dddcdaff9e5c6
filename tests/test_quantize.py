"""Quantization: per-tensor and fine-grained, bit for bit against jax_fp8gemm.reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_fp8gemm as fg
from jax_fp8gemm import reference
from helpers import (BLOCK_SIZES, FORMATS, MANTISSA_BITS, MIN_NORMAL, NP_FLOAT,
                     assert_fp8_equal, bits, on, randn)

FP8_NP = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
MAX_FINITE = {"e4m3": 448.0, "e5m2": 57344.0}

# Partial blocks for every block size: 1, 7 and 129 are below or just past a block,
# 257 is one past 256 (and past several 64- and 128-blocks).
# (5, 256) and (2, 3, 512): rows of whole blocks, which the GPU quantizes with vector loads.
ROW_SHAPES = [(7,), (1, 1), (7, 129), (3, 257), (129, 7), (5, 256), (2, 3, 512)]
MATRIX_SHAPES = [(1, 1), (7, 129), (129, 257), (257, 7)]


def make_x(rng, shape, in_dtype, scale=1.0):
    """Test data in the input dtype, and the same values in float32 (what the reference
    and the error bounds see)."""
    x = randn(rng, shape, scale=scale, dtype=NP_FLOAT[in_dtype])
    return x, np.asarray(x, np.float32)


def assert_scales_equal(scales, expected):
    scales = np.asarray(scales)
    assert scales.dtype == np.float32
    np.testing.assert_array_equal(scales, np.asarray(expected, np.float32))


def roundtrip_bound(x32, scale_per_element, fmt):
    """Largest |x - q * scale| that round-to-nearest-even into FP8 allows, per element.

    x / scale lies within the format's finite range (|x| <= amax and scale = amax /
    max_finite), so no element saturates by more than float32 rounding. A normal FP8 value
    in [2^e, 2^(e+1)) has spacing 2^(e-m) (m mantissa bits), so rounding moves it by at most
    2^(e-m-1) <= 2^-(m+1) * |x / scale|: relative error 2^-4 for e4m3, 2^-3 for e5m2
    (hence also at most 2^-(m+1) of the block's amax). Below the smallest normal, the spacing
    is that of the smallest binade: 2^-(m+1) * min_normal absolutely. The division by the
    scale (a multiplication by its rounded reciprocal) and the multiplication back each round
    in float32 (2^-24 relative, three roundings in all), which the
    factor 1 + 2^-18 covers (it adds 2^-22 of |x| or more).
    """
    m = MANTISSA_BITS[fmt]
    s = np.asarray(scale_per_element, np.float64)
    magnitude = np.maximum(np.abs(x32.astype(np.float64)), MIN_NORMAL[fmt] * s)
    return 2.0 ** -(m + 1) * magnitude * (1 + 2.0 ** -18)


def assert_roundtrip(deq, x32, scale_per_element, fmt):
    deq = np.asarray(deq)
    assert deq.dtype == np.float32 and deq.shape == x32.shape
    err = np.abs(deq.astype(np.float64) - x32)
    bound = roundtrip_bound(x32, scale_per_element, fmt)
    assert (err <= bound).all(), f"max error / bound = {np.max(err / bound):.3f}"
    if x32.size > 1000:
        # The bound is tight: rounding does use most of it somewhere.
        assert np.max(err / bound) > 0.5


def expand(scales, shape, block_rows, block_cols):
    s = np.asarray(scales, np.float64)
    if s.ndim == 0:
        return np.full(shape, s)
    s = np.repeat(np.repeat(s, block_rows, -2), block_cols, -1)
    return s[..., : shape[-2], : shape[-1]]


# ---------------------------------------------------------------------------------------
# Per-tensor.

@pytest.mark.parametrize("shape", [(1,), (7,), (129, 257), (3, 5, 64)])
@pytest.mark.parametrize("in_dtype", list(NP_FLOAT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_fp8_matches_reference(device, rng, fmt, in_dtype, shape):
    x, x32 = make_x(rng, shape, in_dtype, scale=3.0)
    q, scale = fg.quantize_fp8(on(device, x), dtype=fmt)
    ref_q, ref_scale = reference.quantize_tensor(x32, fmt)
    assert q.shape == shape and q.dtype == FP8_NP[fmt]
    assert scale.shape == () and scale.dtype == jnp.float32
    assert_scales_equal(scale, ref_scale)
    assert_fp8_equal(q, ref_q)
    # The largest magnitude maps onto the format's largest finite value.
    assert np.max(np.abs(np.asarray(q, np.float32))) == MAX_FINITE[fmt]


@pytest.mark.parametrize("in_dtype", list(NP_FLOAT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_fp8_roundtrip_within_bound(device, rng, fmt, in_dtype):
    x, x32 = make_x(rng, (96, 160), in_dtype, scale=0.5)
    q, scale = fg.quantize_fp8(on(device, x), dtype=fmt)
    assert_roundtrip(fg.dequantize(q, scale), x32, np.full(x32.shape, np.asarray(scale)), fmt)


# ---------------------------------------------------------------------------------------
# Fine-grained, 1 x bs along the last axis.

@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("in_dtype", list(NP_FLOAT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_fine_grained_rows_match_reference(device, rng, fmt, in_dtype, block_size, shape):
    x, x32 = make_x(rng, shape, in_dtype)
    q, scales = fg.quantize_fp8_fine_grained(on(device, x), block_size, fmt)
    ref_q, ref_s = reference.quantize_rows(x32, block_size, fmt)
    assert q.shape == shape and q.dtype == FP8_NP[fmt]
    assert scales.shape == shape[:-1] + (-(-shape[-1] // block_size),)
    assert_scales_equal(scales, ref_s)
    assert_fp8_equal(q, ref_q)


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("in_dtype", list(NP_FLOAT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_fine_grained_blocks_match_reference(device, rng, fmt, in_dtype, block_size, shape):
    x, x32 = make_x(rng, shape, in_dtype)
    q, scales = fg.quantize_fp8_fine_grained(on(device, x), block_size, fmt,
                                             block_shape=(block_size, block_size))
    ref_q, ref_s = reference.quantize_blocks(x32, block_size, block_size, fmt)
    assert q.shape == shape and q.dtype == FP8_NP[fmt]
    assert_scales_equal(scales, ref_s)
    assert_fp8_equal(q, ref_q)


def test_block_shape_one_by_bs_is_the_default(device, rng):
    x = on(device, randn(rng, (9, 300)))
    q1, s1 = fg.quantize_fp8_fine_grained(x, 64)
    q2, s2 = fg.quantize_fp8_fine_grained(x, 128, block_shape=(1, 64))
    assert_fp8_equal(q1, q2)
    assert_scales_equal(s1, s2)


@pytest.mark.parametrize("block_shape", [None, "square"])
def test_fine_grained_leading_batch_axes(device, rng, block_shape):
    bs = 64
    x = randn(rng, (2, 3, 70, 150))
    shape = None if block_shape is None else (bs, bs)
    q, scales = fg.quantize_fp8_fine_grained(on(device, x), bs, "e4m3", block_shape=shape)
    if block_shape is None:
        assert scales.shape == (2, 3, 70, 3)
        ref_q, ref_s = reference.quantize_rows(x, bs)
    else:
        # Each trailing matrix is blocked on its own.
        assert scales.shape == (2, 3, 2, 3)
        pairs = [reference.quantize_blocks(x[i, j], bs, bs) for i in range(2) for j in range(3)]
        ref_q = np.stack([p[0] for p in pairs]).reshape(x.shape)
        ref_s = np.stack([p[1] for p in pairs]).reshape(scales.shape)
    assert_scales_equal(scales, ref_s)
    assert_fp8_equal(q, ref_q)


@pytest.mark.parametrize("lead", [(), (2,)])
@pytest.mark.parametrize("square", [False, True], ids=["1xbs", "bsxbs"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("in_dtype", list(NP_FLOAT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_transpose_equals_reference_of_transpose(device, rng, fmt, in_dtype, block_size, square,
                                                 lead):
    x = randn(rng, lead + (257, 129), dtype=NP_FLOAT[in_dtype])
    shape = (block_size, block_size) if square else None
    q, scales = fg.quantize_fp8_fine_grained(on(device, x), block_size, fmt,
                                             block_shape=shape, transpose=True)
    xt = np.swapaxes(x, -1, -2)
    assert q.shape == xt.shape
    if square:
        pairs = [reference.quantize_blocks(m, block_size, block_size, fmt)
                 for m in xt.reshape((-1,) + xt.shape[-2:])]
        ref_q = np.stack([p[0] for p in pairs]).reshape(xt.shape)
        ref_s = np.stack([p[1] for p in pairs]).reshape(scales.shape)
    else:
        ref_q, ref_s = reference.quantize_rows(xt, block_size, fmt)
    assert_scales_equal(scales, ref_s)
    assert_fp8_equal(q, ref_q)


# Odd sizes, tiles cut on both axes, whole tiles, a batch, and rows or columns of one value.
DUAL_SHAPES = [(1, 1), (7, 129), (257, 200), (256, 384), (2, 130, 64), (1, 300), (300, 1)]


@pytest.mark.parametrize("shape", DUAL_SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("in_dtype", list(NP_FLOAT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_with_transpose_is_both_layouts(device, rng, fmt, in_dtype, block_size, shape):
    x, x32 = make_x(rng, shape, in_dtype, scale=2.0)
    q, s, qt, st = fg.quantize_fp8_with_transpose(on(device, x), block_size, fmt)
    ref_q, ref_s = reference.quantize_rows(x32, block_size, fmt)
    ref_qt, ref_st = reference.quantize_rows(np.swapaxes(x32, -1, -2), block_size, fmt)
    assert q.dtype == qt.dtype == FP8_NP[fmt]
    assert qt.shape == shape[:-2] + (shape[-1], shape[-2])
    assert_scales_equal(s, ref_s)
    assert_fp8_equal(q, ref_q)
    assert_scales_equal(st, ref_st)
    assert_fp8_equal(qt, ref_qt)


def test_with_transpose_under_vmap_and_jit(device, rng):
    x = on(device, randn(rng, (3, 2, 130, 257), dtype=np.float32).astype(jnp.bfloat16))
    got = jax.jit(jax.vmap(lambda v: fg.quantize_fp8_with_transpose(v, 64)))(x)
    want = fg.quantize_fp8_with_transpose(x, 64)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8))


@pytest.mark.parametrize("square", [False, True], ids=["1xbs", "bsxbs"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("in_dtype", list(NP_FLOAT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_fine_grained_roundtrip_within_bound(device, rng, fmt, in_dtype, block_size, square):
    x, x32 = make_x(rng, (130, 300), in_dtype, scale=2.0)
    shape = (block_size, block_size) if square else None
    q, scales = fg.quantize_fp8_fine_grained(on(device, x), block_size, fmt, block_shape=shape)
    deq = fg.dequantize(q, scales, block_size)
    rows = block_size if square else 1
    assert_roundtrip(deq, x32, expand(scales, x32.shape, rows, block_size), fmt)


@pytest.mark.parametrize("square", [False, True], ids=["1xbs", "bsxbs"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_compute_scales_equals_quantize_scales(device, rng, block_size, square):
    x = on(device, randn(rng, (2, 150, 333), scale=4.0))
    shape = (block_size, block_size) if square else None
    for fmt in FORMATS:
        _, scales = fg.quantize_fp8_fine_grained(x, block_size, fmt, block_shape=shape)
        assert_scales_equal(fg.compute_scales(x, block_size, fmt, block_shape=shape), scales)


# ---------------------------------------------------------------------------------------
# dequantize: x_fp8 * scale with the scale broadcast over its block, in float32.

@pytest.mark.parametrize("layout", ["tensor", "1xbs", "bsxbs"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_dequantize_is_elementwise_product(device, rng, layout, block_size):
    x = randn(rng, (2, 200, 300))
    if layout == "tensor":
        q, s = fg.quantize_fp8(on(device, x))
        rows, cols = 1, 1
    else:
        rows = block_size if layout == "bsxbs" else 1
        q, s = fg.quantize_fp8_fine_grained(on(device, x), block_size,
                                            block_shape=(rows, block_size))
        cols = block_size
    deq = fg.dequantize(q, s, block_size)
    expected = np.asarray(q, np.float32) * expand(s, x.shape, rows, cols).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(deq), expected)


def test_dequantize_one_dimensional_rows(device, rng):
    x = randn(rng, (300,))
    q, s = fg.quantize_fp8_fine_grained(on(device, x), 128)
    assert s.shape == (3,)
    deq = fg.dequantize(q, s, 128)
    expected = np.asarray(q, np.float32) * np.repeat(np.asarray(s), 128)[:300]
    np.testing.assert_array_equal(np.asarray(deq), expected)


# ---------------------------------------------------------------------------------------
# Special values.

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["tensor", "1xbs", "bsxbs"])
def test_all_zero_input(device, fmt, how):
    x = on(device, np.zeros((130, 200), np.float32))
    if how == "tensor":
        q, s = fg.quantize_fp8(x, fmt)
    else:
        q, s = fg.quantize_fp8_fine_grained(x, 128, fmt,
                                            block_shape=(128, 128) if how == "bsxbs" else None)
    # The amax floor: a finite, positive scale, and exact (positive) zeros.
    expected = np.float32(1e-12) / np.float32(MAX_FINITE[fmt])
    np.testing.assert_array_equal(np.asarray(s), np.full(np.shape(s), expected, np.float32))
    assert (bits(q) == 0).all()
    assert (np.asarray(fg.dequantize(q, s, 128)) == 0).all()


@pytest.mark.parametrize("huge", [1e30, 3.0e38, float(np.finfo(np.float32).max)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["tensor", "1xbs", "bsxbs"])
def test_huge_inputs_saturate_without_inf(device, rng, fmt, how, huge):
    x = randn(rng, (130, 300))
    x[3, 5], x[100, 260] = huge, -huge
    if how == "tensor":
        q, s = fg.quantize_fp8(on(device, x), fmt)
        ref_q, ref_s = reference.quantize_tensor(x, fmt)
    elif how == "1xbs":
        q, s = fg.quantize_fp8_fine_grained(on(device, x), 128, fmt)
        ref_q, ref_s = reference.quantize_rows(x, 128, fmt)
    else:
        q, s = fg.quantize_fp8_fine_grained(on(device, x), 128, fmt, block_shape=(128, 128))
        ref_q, ref_s = reference.quantize_blocks(x, 128, 128, fmt)
    assert_scales_equal(s, ref_s)
    assert_fp8_equal(q, ref_q)
    qf = np.asarray(q, np.float32)
    assert np.isfinite(qf).all() and np.isfinite(np.asarray(s)).all()
    assert qf[3, 5] == MAX_FINITE[fmt] and qf[100, 260] == -MAX_FINITE[fmt]
    if huge <= 3.0e38:
        # q * scale stays finite while amax is not within float32 rounding of its max.
        deq = np.asarray(fg.dequantize(q, s, 128))
        assert np.isfinite(deq).all()
        np.testing.assert_allclose(deq[3, 5], huge, rtol=1e-6)


def _quantize(x, how, fmt):
    if how == "tensor":
        return fg.quantize_fp8(x, fmt)
    shape = (128, 128) if how == "bsxbs" else None
    return fg.quantize_fp8_fine_grained(x, 128, fmt, block_shape=shape)


def _block_mask(shape, how, block):
    """Boolean mask of the elements in the quantization block whose top-left is `block`."""
    mask = np.zeros(shape, bool)
    r, c = block
    if how == "tensor":
        mask[:] = True
    elif how == "1xbs":
        mask[r, c * 128:(c + 1) * 128] = True
    else:
        mask[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128] = True
    return mask


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["tensor", "1xbs", "bsxbs"])
def test_nan_and_inf_poison_only_their_block(device, rng, fmt, how, bad):
    """quantization.py: a NaN or inf in a block makes that block's scale NaN or inf and
    every value dequantized from it NaN; other blocks are unaffected."""
    x = randn(rng, (260, 300))
    clean_q, clean_s = _quantize(on(device, x), how, fmt)
    x[130, 140] = float(bad)  # scale block (1, 1) for bs x bs, (130, 1) for 1 x bs
    q, s = _quantize(on(device, x), how, fmt)
    deq = np.asarray(fg.dequantize(q, s, 128))
    s, clean_s = np.asarray(s), np.asarray(clean_s)

    block = (130, 1) if how == "1xbs" else (1, 1)
    mask = _block_mask(x.shape, how, block)
    scale_idx = () if how == "tensor" else block
    if bad == "nan":
        assert np.isnan(s[scale_idx])
        assert np.isnan(np.asarray(q, np.float32)[mask]).all()
    else:
        assert s[scale_idx] == np.inf
    assert np.isnan(deq[mask]).all()
    # Everything else is exactly what it was without the bad value.
    if how != "tensor":
        other = np.ones(s.shape, bool)
        other[scale_idx] = False
        np.testing.assert_array_equal(s[other], clean_s[other])
        np.testing.assert_array_equal(bits(q)[~mask], bits(clean_q)[~mask])
        assert np.isfinite(deq[~mask]).all()
    # And the reference agrees bit for bit.
    ref_q, ref_s = {"tensor": lambda: reference.quantize_tensor(x, fmt),
                    "1xbs": lambda: reference.quantize_rows(x, 128, fmt),
                    "bsxbs": lambda: reference.quantize_blocks(x, 128, 128, fmt)}[how]()
    np.testing.assert_array_equal(s, np.asarray(ref_s, np.float32))
    assert_fp8_equal(q, ref_q)


# ---------------------------------------------------------------------------------------
# dtype spellings.

@pytest.mark.parametrize("spelling, fmt", [("e4m3", "e4m3"), ("e5m2", "e5m2"),
                                           (jnp.float8_e4m3fn, "e4m3"), (jnp.float8_e5m2, "e5m2"),
                                           (jnp.dtype(jnp.float8_e4m3fn), "e4m3")])
def test_dtype_spellings(device, rng, spelling, fmt):
    x = on(device, randn(rng, (5, 130)))
    q, _ = fg.quantize_fp8(x, dtype=spelling)
    assert q.dtype == FP8_NP[fmt]
    q, _ = fg.quantize_fp8_fine_grained(x, 128, dtype=spelling)
    assert q.dtype == FP8_NP[fmt]


@pytest.mark.parametrize("spelling", ["e4m3fn", "E4M3", "fp8", "", "float8_e4m3fn",
                                      jnp.float8_e4m3fnuz, jnp.float8_e4m3b11fnuz,
                                      jnp.float16, jnp.bfloat16, None, 8])
def test_other_dtypes_rejected(rng, spelling):
    x = randn(rng, (4, 64))
    for quantize in (lambda: fg.quantize_fp8(x, dtype=spelling),
                     lambda: fg.quantize_fp8_fine_grained(x, 64, dtype=spelling),
                     lambda: fg.compute_scales(x, 64, dtype=spelling)):
        with pytest.raises(ValueError, match="dtype must be 'e4m3', 'e5m2'"):
            quantize()
