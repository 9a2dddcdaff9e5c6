"""Dense GEMMs: fp8_gemm (per-tensor) and fp8_gemm_fine_grained (1D2D and 1D1D scales).

Each result is checked twice: (a) every element against the float64 product of the
dequantized FP8 inputs, within float32 (or bfloat16) rounding; (b) against the float32
product of the unquantized inputs with DeepGEMM's calc_diff, which catches a kernel that
reads the right bytes with the wrong scales.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fp8gemm as fg
from jax_fp8gemm import reference
from conftest import hopper_device, seed_of
from helpers import (OUT_DTYPES, assert_gemm_close, calc_diff, on, quantize_a, quantize_b,
                     randn, reference_product)

# calc_diff of an e4m3 x e4m3 product against the unquantized one: each operand carries a
# relative rounding error of RMS ~2^-4/sqrt(6) ~ 0.025, so a product of random vectors is
# off by ~0.036 relative, calc_diff ~ 0.036^2 / 2 ~ 6.5e-4 (DeepGEMM asserts < 1e-3).
CALC_DIFF_MAX = 1e-3


def run_gemm(mode, a, sa, b, sb, *, layout, out_dtype, block_size=128, accumulator=None):
    if mode == "tensor":
        assert accumulator is None
        return fg.fp8_gemm(a, b, sa, sb, out_dtype=out_dtype, b_layout=layout)
    return fg.fp8_gemm_fine_grained(a, b, sa, sb, block_size, out_dtype, b_layout=layout,
                                    b_scaling=mode, accumulator=accumulator)


def check_gemm(device, rng, m, n, k, mode, layout, out_name, *, accumulate=False, block_size=128,
               fmts=("e4m3", "e4m3"), lead=(), b_kn=None, quantized_b=None, check_diff=True):
    """Quantizes random a [*lead, M, K] and b [K, N] through the public API, multiplies,
    and checks (a) and (b)."""
    out_dtype = OUT_DTYPES[out_name]
    a = randn(rng, lead + (m, k))
    if b_kn is None:
        b_kn = randn(rng, (k, n))
    qa, sa = quantize_a(on(device, a), mode, block_size, fmts[0])
    if quantized_b is None:
        quantized_b = quantize_b(on(device, b_kn), mode, layout, block_size, fmts[1])
    qb, sb, qb_nk, sb_nk = quantized_b
    acc = None
    if accumulate:
        acc = randn(rng, lead + (m, n), scale=math.sqrt(k))
    out = run_gemm(mode, qa, sa, qb, sb, layout=layout, out_dtype=out_dtype,
                   block_size=block_size, accumulator=None if acc is None else on(device, acc))
    assert out.shape == lead + (m, n) and out.dtype == out_dtype
    assert out.devices() == {device}

    qa2 = np.asarray(qa).reshape(-1, k)
    sa2 = np.asarray(sa) if mode == "tensor" else np.asarray(sa).reshape(qa2.shape[0], -1)
    ref, absprod = reference_product(qa2, sa2, qb_nk, sb_nk, mode, block_size)
    out2 = np.asarray(out).reshape(-1, n)
    assert_gemm_close(out2, ref, absprod, None if acc is None else acc.reshape(-1, n))
    if check_diff:
        product = a.reshape(-1, k) @ b_kn
        got = out2.astype(np.float32) - (0 if acc is None else acc.reshape(-1, n))
        diff = calc_diff(got, product)
        assert diff < CALC_DIFF_MAX, diff
    return out


# ---------------------------------------------------------------------------------------
# The test's own reference against the oracle.

@pytest.mark.parametrize("mode", ["tensor", "block", "row"])
def test_reference_product_matches_oracle(rng, mode):
    # N above reference_product's chunk, with a partial last block.
    a, b = randn(rng, (9, 300)), randn(rng, (300, 4100))
    qa, sa = quantize_a(a, mode)
    _, _, qb_nk, sb_nk = quantize_b(b, mode, "nk")
    ref, absprod = reference_product(qa, sa, qb_nk, sb_nk, mode)
    expected = reference.gemm(np.asarray(qa), qb_nk, np.asarray(sa), sb_nk, mode, 128)
    assert (np.abs(ref - expected) <= 1e-13 * absprod).all()


# ---------------------------------------------------------------------------------------
# Odd shapes: every value of {1, 7, 129, 2049} in every position.

ODD_SHAPES = [  # (M, N, K)
    (1, 1, 1), (7, 7, 7), (129, 129, 129), (1, 7, 129), (7, 129, 1), (129, 1, 7),
    (2049, 7, 129), (1, 2049, 7), (7, 129, 2049), (129, 1, 2049), (2049, 2049, 7),
]


def diff_is_meaningful(m, n, k):
    # calc_diff is a statistic, near 1e-3 only on average: it needs many outputs and many
    # rounded values of each operand behind them (a single e4m3 x e4m3 product can be off
    # by 2^-3 relative; with M = 1 every output shares a's K rounding errors). Measured over
    # 20 seeds, shapes past these limits stay below 8e-4.
    return min(m * n, m * k, n * k) >= 500


FINE_VARIANTS = [  # (b_layout, out dtype, accumulate)
    ("kn", "bfloat16", False),
    ("nk", "bfloat16", False),
    ("nk", "float32", False),
    ("kn", "float32", True),
    ("nk", "float32", True),
]


@pytest.mark.parametrize("layout, out_name, accumulate", FINE_VARIANTS)
@pytest.mark.parametrize("mode", ["block", "row"])
@pytest.mark.parametrize("m, n, k", ODD_SHAPES)
def test_fine_grained_odd_shapes(device, rng, m, n, k, mode, layout, out_name, accumulate):
    check_gemm(device, rng, m, n, k, mode, layout, out_name, accumulate=accumulate,
               check_diff=diff_is_meaningful(m, n, k))


@pytest.mark.parametrize("layout, out_name", [("kn", "bfloat16"), ("nk", "float32"),
                                              ("kn", "float32"), ("nk", "bfloat16")])
@pytest.mark.parametrize("m, n, k", ODD_SHAPES)
def test_per_tensor_odd_shapes(device, rng, m, n, k, layout, out_name):
    check_gemm(device, rng, m, n, k, "tensor", layout, out_name,
               check_diff=diff_is_meaningful(m, n, k))


def test_odd_k_reaches_the_kernel_padded_to_16():
    # The Hopper kernel needs K % 16 == 0 (TMA row pitch); other K are padded with zeros
    # before the primitive (the odd-shape tests above check that the results are unchanged).
    a = jnp.zeros((5, 2049), jnp.float8_e4m3fn)
    b = jnp.zeros((7, 2049), jnp.float8_e4m3fn)
    sa, sb = jnp.ones((5, 17), jnp.float32), jnp.ones((1, 17), jnp.float32)
    jaxpr = jax.make_jaxpr(functools.partial(fg.fp8_gemm_fine_grained, b_layout="nk"))(
        a, b, sa, sb)
    (call,) = [e for e in jaxpr.eqns if e.primitive.name.endswith("gemm")]
    assert call.invars[0].aval.shape == (5, 2064)
    assert call.invars[1].aval.shape == (7, 2064)


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("mode", ["block", "row"])
@pytest.mark.parametrize("block_size", [64, 256])
def test_fine_grained_block_sizes(device, rng, block_size, mode, layout):
    check_gemm(device, rng, 33, 300, 700, mode, layout, "float32", block_size=block_size,
               accumulate=mode == "row")


# The Hopper kernel's tile shapes (FP8GEMM_SM90_TILES in csrc/cuda/sm90_gemm_launch.cuh),
# each forced through JAX_FP8GEMM_SM90_TILE, which the handler reads at every call.
SM90_TILES = ["64x16", "64x32", "64x64", "64x128", "64x192", "128x128", "128x160", "128x192",
              "256x128"]


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [64, 128, 256])
@pytest.mark.parametrize("tile", SM90_TILES)
def test_every_sm90_tile(rng, monkeypatch, tile, block_size):
    device = hopper_device()
    monkeypatch.setenv("JAX_FP8GEMM_SM90_TILE", tile)
    # M and N cut the tiles and the scale blocks unevenly (N = 530 starts 160-wide tiles at
    # every offset inside a 128-wide block); K is a multiple of 16 with a tail in the last
    # scale block.
    with jax.default_device(device):
        check_gemm(device, rng, 300, 530, 528, "block", "nk", "bfloat16", block_size=block_size)
        check_gemm(device, rng, 129, 400, 656, "block", "kn", "float32", accumulate=True,
                   block_size=block_size, fmts=("e4m3", "e5m2"), check_diff=False)
        check_gemm(device, rng, 70, 200, 272, "tensor", "kn", "float32", fmts=("e5m2", "e4m3"),
                   check_diff=False)
        # Scale rows of 4, 8 or 16 K blocks (16-byte aligned: loaded by TMA above 128 rows)
        # and N % 8 == 0 (whole tiles stored 16 bytes a lane).
        check_gemm(device, rng, 300, 512, 1024, "block", "nk", "bfloat16", block_size=block_size)


# Row scales (the weight gradient's 1D1D form) run on their own tile list; 128- and 256-row
# tiles leave 64-wide blocks to the 64-row ones (a forced shape not compiled is ignored).
SM90_ROW_TILES = ["64x64", "64x128", "128x128", "256x128"]


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [64, 128, 256])
@pytest.mark.parametrize("tile", SM90_ROW_TILES)
def test_every_sm90_row_scale_tile(rng, monkeypatch, tile, block_size):
    device = hopper_device()
    monkeypatch.setenv("JAX_FP8GEMM_SM90_TILE", tile)
    with jax.default_device(device):
        check_gemm(device, rng, 300, 530, 528, "row", "nk", "float32", accumulate=True,
                   block_size=block_size)
        check_gemm(device, rng, 129, 200, 656, "row", "kn", "bfloat16", block_size=block_size,
                   fmts=("e4m3", "e5m2"), check_diff=False)
        # Both operands' row scales by TMA (rows of 4, 8 or 16 K blocks, more than 128 rows).
        check_gemm(device, rng, 300, 512, 1024, "row", "nk", "float32", accumulate=True,
                   block_size=block_size)
        check_gemm(device, rng, 300, 512, 1024, "row", "kn", "bfloat16", block_size=block_size)


@pytest.mark.parametrize("fmts", [("e5m2", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e5m2")])
@pytest.mark.parametrize("mode", ["tensor", "block", "row"])
def test_e5m2_operands(device, rng, mode, fmts):
    # e5m2 has one mantissa bit less: (b) does not hold at 1e-3, (a) does.
    check_gemm(device, rng, 20, 200, 300, mode, "nk", "float32", fmts=fmts, check_diff=False)


@pytest.mark.parametrize("mode, accumulate", [("tensor", False), ("block", False),
                                              ("row", True)])
def test_leading_axes_of_a(device, rng, mode, accumulate):
    check_gemm(device, rng, 5, 136, 260, mode, "kn", "float32", accumulate=accumulate,
               lead=(2, 3))


def test_one_dimensional_a(device, rng):
    a, b = randn(rng, (300,)), randn(rng, (300, 40))
    qa, sa = fg.quantize_fp8_fine_grained(on(device, a))
    qb, sb = fg.quantize_fp8_fine_grained(on(device, b), block_shape=(128, 128))
    out = fg.fp8_gemm_fine_grained(qa, qb, sa, sb, out_dtype=jnp.float32)
    assert out.shape == (40,)
    out2 = fg.fp8_gemm_fine_grained(qa[None], qb, sa[None], sb, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2)[0])


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("mode", ["tensor", "block", "row"])
def test_empty_a(device, rng, mode, layout):
    """M = 0 (an expert that got no tokens) gives an empty [0, N] result."""
    qa, sa = quantize_a(on(device, randn(rng, (0, 256))), mode)
    qb, sb, _, _ = quantize_b(on(device, randn(rng, (256, 40))), mode, layout)
    out = run_gemm(mode, qa, sa, qb, sb, layout=layout, out_dtype=jnp.float32)
    assert out.shape == (0, 40) and out.dtype == jnp.float32


def test_accumulator_adds(device, rng):
    """accumulator + a @ b equals a @ b plus the accumulator, to float32 rounding."""
    a, b = randn(rng, (17, 256)), randn(rng, (256, 96))
    acc = randn(rng, (17, 96), scale=10.0)
    qa, sa = fg.quantize_fp8_fine_grained(on(device, a))
    qb, sb = fg.quantize_fp8_fine_grained(on(device, b), block_shape=(128, 128))
    plain = np.asarray(fg.fp8_gemm_fine_grained(qa, qb, sa, sb, out_dtype=jnp.float32))
    summed = np.asarray(fg.fp8_gemm_fine_grained(qa, qb, sa, sb, out_dtype=jnp.float32,
                                                 accumulator=on(device, acc)))
    # The kernel adds the accumulator to the same float32 sum, then rounds once.
    np.testing.assert_array_equal(summed, plain + acc)


# ---------------------------------------------------------------------------------------
# The DeepSeek-V3 weight shapes (N, K), with decoding-sized M.

DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
               (7168, 2048)]

DEEPSEEK_CASES = [  # (scaling, M, b_layout, out dtype, accumulate)
    ("block", 1, "nk", "float32", False),
    ("block", 7, "kn", "bfloat16", False),
    ("row", 7, "nk", "float32", True),
    ("row", 1, "kn", "bfloat16", False),
    ("tensor", 7, "nk", "bfloat16", False),
    ("tensor", 1, "kn", "float32", False),
]


@pytest.fixture(scope="module")
def deepseek_weight(request):
    """One random b [K, N] per shape, and its quantizations (per device and scaling),
    shared by the cases of that shape: quantizing a 7168 x 16384 weight takes seconds."""
    n, k = request.param
    b = randn(np.random.default_rng(seed_of(f"deepseek {n} x {k}")), (k, n))
    return b, {}


def quantized_weight(weight, device, mode, layout):
    b, cache = weight
    key = (device, mode)
    if key not in cache:
        qkn, skn, q_nk, s_nk = quantize_b(on(device, b), mode, "kn")
        cache[key] = (qkn, skn, q_nk, s_nk)
    qkn, skn, q_nk, s_nk = cache[key]
    if layout == "kn":
        return qkn, skn, q_nk, s_nk
    return on(device, q_nk), (on(device, s_nk) if mode != "tensor" else skn), q_nk, s_nk


def nk_id(nk):
    return f"N{nk[0]}-K{nk[1]}"


@pytest.mark.slow
@pytest.mark.parametrize("mode, m, layout, out_name, accumulate", DEEPSEEK_CASES)
@pytest.mark.parametrize("deepseek_weight", DEEPSEEK_NK, indirect=True, ids=nk_id)
def test_deepseek_shapes(device, rng, deepseek_weight, mode, m, layout, out_name, accumulate):
    b = deepseek_weight[0]
    k, n = b.shape
    check_gemm(device, rng, m, n, k, mode, layout, out_name, accumulate=accumulate, b_kn=b,
               quantized_b=quantized_weight(deepseek_weight, device, mode, layout))


@pytest.mark.slow
@pytest.mark.parametrize("deepseek_weight", [(7168, 2048), (2112, 7168)], indirect=True,
                         ids=nk_id)
def test_deepseek_shapes_m64(device, rng, deepseek_weight):
    b = deepseek_weight[0]
    k, n = b.shape
    check_gemm(device, rng, 64, n, k, "block", "nk", "bfloat16", b_kn=b,
               quantized_b=quantized_weight(deepseek_weight, device, "block", "nk"))


# ---------------------------------------------------------------------------------------

def test_deterministic(device, rng):
    """The same call twice gives the same bits (one thread per output, fixed order)."""
    a, b = randn(rng, (70, 1000)), randn(rng, (1000, 300))
    qa, sa = fg.quantize_fp8_fine_grained(on(device, a))
    qb, sb = fg.quantize_fp8_fine_grained(on(device, b), block_shape=(128, 128))
    first = np.asarray(fg.fp8_gemm_fine_grained(qa, qb, sa, sb, out_dtype=jnp.float32))
    second = np.asarray(fg.fp8_gemm_fine_grained(qa, qb, sa, sb, out_dtype=jnp.float32))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_cpu_result_independent_of_thread_count(rng, monkeypatch, threads):
    """README: on the CPU, results do not depend on JAX_FP8GEMM_CPU_THREADS (read per call)."""
    cpu = jax.devices("cpu")[0]
    a, b = on(cpu, randn(rng, (100, 700))), on(cpu, randn(rng, (700, 90)))
    run = lambda: (fg.quantize_fp8_fine_grained(a), fg.quantize_fp8_fine_grained(
        b, block_shape=(128, 128)))
    (qa, sa), (qb, sb) = run()
    out = np.asarray(fg.fp8_gemm_fine_grained(qa, qb, sa, sb, out_dtype=jnp.float32))
    monkeypatch.setenv("JAX_FP8GEMM_CPU_THREADS", threads)
    (qa2, sa2), (qb2, sb2) = run()
    np.testing.assert_array_equal(np.asarray(qa2).view(np.uint8), np.asarray(qa).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(sb2), np.asarray(sb))
    out2 = np.asarray(fg.fp8_gemm_fine_grained(qa2, qb2, sa2, sb2, out_dtype=jnp.float32))
    np.testing.assert_array_equal(out2, out)


def test_donated_accumulator(device, rng):
    """README: jit the accumulating call with the accumulator donated, to update it in place."""
    a, w = randn(rng, (64, 384)), randn(rng, (200, 384))  # w [N, K]
    qa, sa = fg.quantize_fp8_fine_grained(on(device, a))
    qw, sw = fg.quantize_fp8_fine_grained(on(device, w), block_shape=(128, 128))

    @functools.partial(jax.jit, donate_argnums=0)
    def accumulate(acc, a_fp8, w_fp8, sa, sw):
        return fg.fp8_gemm_fine_grained(a_fp8, w_fp8, sa, sw, out_dtype=jnp.float32,
                                        b_layout="nk", accumulator=acc)

    acc0 = randn(rng, (64, 200))
    acc = on(device, acc0)
    for _ in range(2):
        acc = accumulate(acc, qa, qw, sa, sw)
    product = np.asarray(fg.fp8_gemm_fine_grained(qa, qw, sa, sw, out_dtype=jnp.float32,
                                                  b_layout="nk"))
    np.testing.assert_array_equal(np.asarray(acc), (acc0 + product) + product)


@pytest.mark.parametrize("mode", ["tensor", "block", "row"])
def test_nan_in_a_block_poisons_its_outputs(device, rng, mode):
    """quantization.py: every GEMM output that reads a NaN block is NaN, the rest are not."""
    a, b = randn(rng, (6, 384)), randn(rng, (384, 260))
    a[2, 200] = np.nan
    qa, sa = quantize_a(on(device, a), mode)
    qb, sb, _, _ = quantize_b(on(device, b), mode, "nk")
    out = np.asarray(run_gemm(mode, qa, sa, qb, sb, layout="nk", out_dtype=jnp.float32))
    if mode == "tensor":
        assert np.isnan(out).all()
    else:
        assert np.isnan(out[2]).all()
        assert np.isfinite(np.delete(out, 2, axis=0)).all()
