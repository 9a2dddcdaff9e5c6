"""Grouped (MoE) GEMMs: contiguous groups, the list form, masked groups and the fused
expert MLP, each against a per-group loop of the float64 reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fp8gemm as fg
from jax_fp8gemm import reference
from jax_fp8gemm.primitives import grouped as grouped_prim
from conftest import gpu_device, hopper_device
from helpers import (OUT_DTYPES, assert_gemm_close, calc_diff, dequant, grouped_reference, on,
                     on_tensor_cores, randn,
                     reference_product, rows_in_groups)

K, N = 320, 200  # both with a partial last 128-block


def quantize_experts(w, scaling, layout, block_size=128, fmt="e4m3"):
    """w [G, K, N] float -> (w_fp8, scale_w) for `layout`, and (q_nk, s_nk) in numpy for
    grouped_reference. Per-tensor: one scale per expert."""
    if scaling == "tensor":
        pairs = [fg.quantize_fp8(w[g], fmt) for g in range(w.shape[0])]
        q, s = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
        q_nk, s_nk = jnp.swapaxes(q, 1, 2), s
    else:
        q, s = fg.quantize_fp8_fine_grained(w, block_size, fmt, block_shape=(block_size, block_size))
        q_nk, s_nk = jnp.swapaxes(q, 1, 2), jnp.swapaxes(s, 1, 2)
    qw, sw = (q, s) if layout == "kn" else (q_nk, s_nk)
    return qw, sw, np.ascontiguousarray(np.asarray(q_nk)), np.asarray(s_nk)


def quantize_tokens(x, scaling, groups, block_size=128, fmt="e4m3"):
    """x [M, K] -> (x_fp8, scale_x as grouped_gemm takes it, scale_x per group for
    grouped_reference)."""
    if scaling == "tensor":
        q, s = fg.quantize_fp8(x, fmt)
        return q, s, np.full(groups, np.asarray(s))
    q, s = fg.quantize_fp8_fine_grained(x, block_size, fmt)
    return q, s, np.asarray(s)


def make_problem(device, rng, m, groups, scaling, layout, block_size=128):
    x = on(device, randn(rng, (m, K)))
    w = on(device, randn(rng, (groups, K, N)))
    qx, sx, sx_ref = quantize_tokens(x, scaling, groups, block_size)
    qw, sw, qw_nk, sw_nk = quantize_experts(w, scaling, layout, block_size)
    return (qx, sx, qw, sw), (qx, sx_ref, qw_nk, sw_nk)


# (M_total, group_sizes): sizes of 0 and 1, counts not a multiple of 4, a sum below M_total
# (the tail must come back as zeros), one group with everything, and the out-of-range
# policy: a negative size counts as 0, a sum past M_total is cut there.
SIZE_CASES = {
    "zero-and-one": (70, [0, 1, 69]),
    "g5-sum-below-total": (100, [3, 0, 17, 1, 40]),
    "g7": (150, [30, 0, 7, 64, 1, 18, 30]),
    "one-group-has-all": (90, [0, 0, 90, 0]),
    "negative-size": (64, [20, -5, 30]),
    "sum-past-total": (64, [40, 50, 30]),
    "all-empty": (16, [0, 0, 0]),
    "int32-extremes": (40, [5, 2 ** 31 - 1, -(2 ** 31), 3]),
}


@pytest.mark.parametrize("case", list(SIZE_CASES))
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("scaling", ["tensor", "block"])
def test_grouped_gemm_matches_per_group_loop(device, rng, scaling, layout, case):
    m, sizes = SIZE_CASES[case]
    sizes = np.asarray(sizes, np.int32)
    args, ref_args = make_problem(device, rng, m, len(sizes), scaling, layout)
    qx, sx, qw, sw = args
    out = fg.grouped_gemm(qx, qw, sx, sw, on(device, sizes), w_layout=layout)
    assert out.shape == (m, N) and out.dtype == jnp.bfloat16
    ref, absprod = grouped_reference(*ref_args, sizes, scaling)
    assert_gemm_close(out, ref, absprod)
    out = np.asarray(out, np.float32)
    assert (out[~rows_in_groups(sizes, m)] == 0).all()
    if case == "sum-past-total":
        assert reference.group_ranges(sizes, m) == [(0, 40), (40, 64), (64, 64)]
    if case == "negative-size":
        assert reference.group_ranges(sizes, m) == [(0, 20), (20, 20), (20, 50)]
        assert (out[50:] == 0).all() and (out[:50] != 0).any(axis=1).all()


@pytest.mark.parametrize("out_name", list(OUT_DTYPES))
@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_grouped_gemm_out_dtypes_and_block_sizes(device, rng, block_size, out_name):
    sizes = np.asarray([33, 0, 60, 7, 1], np.int32)
    args, ref_args = make_problem(device, rng, 110, 5, "block", "nk", block_size)
    qx, sx, qw, sw = args
    out = fg.grouped_gemm(qx, qw, sx, sw, on(device, sizes), out_dtype=OUT_DTYPES[out_name],
                          block_size=block_size, w_layout="nk")
    assert out.dtype == OUT_DTYPES[out_name]
    ref, absprod = grouped_reference(*ref_args, sizes, "block", block_size)
    assert_gemm_close(out, ref, absprod)
    assert (np.asarray(out, np.float32)[101:] == 0).all()


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_per_tensor_scale_x_per_group(device, rng, layout):
    """Per-tensor scale_x may be [G]: the rows of group g are quantized with scale_x[g]."""
    sizes = np.asarray([10, 0, 25, 1, 14], np.int32)
    m = 60
    x = randn(rng, (m, K))
    # Groups of very different magnitude, so one scale for all would be a different result.
    x *= np.repeat(np.asarray([1.0, 1.0, 30.0, 0.1, 3.0, 1.0], np.float32),
                   list(sizes) + [m - sizes.sum()])[:, None]
    bounds = np.cumsum([0] + list(sizes))
    parts = [fg.quantize_fp8(on(device, x[bounds[g]:bounds[g + 1]])) for g in range(5)]
    parts.append(fg.quantize_fp8(on(device, x[bounds[-1]:])))  # the rows past the sum
    qx = jnp.concatenate([p[0] for p in parts])
    sx = jnp.stack([p[1] for p in parts[:5]])
    w = on(device, randn(rng, (5, K, N)))
    qw, sw, qw_nk, sw_nk = quantize_experts(w, "tensor", layout)
    out = fg.grouped_gemm(qx, qw, sx, sw, on(device, sizes), out_dtype=jnp.float32,
                          w_layout=layout)
    ref, absprod = grouped_reference(qx, np.asarray(sx), qw_nk, sw_nk, sizes, "tensor")
    assert_gemm_close(out, ref, absprod)


@pytest.mark.parametrize("scale_w_shape", ["scalar", "per-group"])
def test_per_tensor_scalar_scales_broadcast(device, rng, scale_w_shape):
    """A scalar scale_w (or scale_x) serves every group."""
    sizes = np.asarray([12, 20, 9], np.int32)
    x, w = randn(rng, (41, K)), randn(rng, (3, K, N))
    qx, sx = fg.quantize_fp8(on(device, x))
    qw, sw = fg.quantize_fp8(on(device, w))  # one scale over all experts
    if scale_w_shape == "per-group":
        sw = jnp.broadcast_to(sw, (3,))
    out = fg.grouped_gemm(qx, qw, sx, sw, on(device, sizes), out_dtype=jnp.float32)
    ref, absprod = grouped_reference(qx, np.full(3, np.asarray(sx)),
                                     np.asarray(jnp.swapaxes(qw, 1, 2)),
                                     np.full(3, np.asarray(sw).reshape(-1)[0]), sizes, "tensor")
    assert_gemm_close(out, ref, absprod)


# ---------------------------------------------------------------------------------------
# The list form (the usage guide's): one entry per expert.

@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("scaling", ["tensor", "block"])
def test_list_form_equals_per_expert_gemms(device, rng, scaling, layout):
    rows = [5, 0, 33, 1, 130]
    xs, sxs, ws, sws = [], [], [], []
    for m_i in rows:
        x_i = on(device, randn(rng, (m_i, K)))
        w_i = randn(rng, (K, N))
        if layout == "nk":
            w_i = np.ascontiguousarray(w_i.T)
        if scaling == "tensor":
            q, s = fg.quantize_fp8(x_i)
            qw, sw = fg.quantize_fp8(on(device, w_i))
        else:
            q, s = fg.quantize_fp8_fine_grained(x_i)
            qw, sw = fg.quantize_fp8_fine_grained(on(device, w_i), block_shape=(128, 128))
        xs.append(q), sxs.append(s), ws.append(qw), sws.append(sw)

    outs = fg.grouped_gemm(xs, ws, sxs, sws, out_dtype=jnp.float32, w_layout=layout)
    assert isinstance(outs, list) and len(outs) == len(rows)
    for i, m_i in enumerate(rows):
        assert outs[i].shape == (m_i, N)
        if not m_i:
            continue  # an empty expert (fp8_gemm of M = 0 is test_gemm's test_empty_a)
        if scaling == "tensor":
            expected = fg.fp8_gemm(xs[i], ws[i], sxs[i], sws[i], out_dtype=jnp.float32,
                                   b_layout=layout)
        else:
            expected = fg.fp8_gemm_fine_grained(xs[i], ws[i], sxs[i], sws[i],
                                                out_dtype=jnp.float32, b_layout=layout)
        # Same problem, same kernel arithmetic: the same bits (on Hopper the grouped and
        # dense GEMMs are different kernels until they share the wgmma mainloop).
        if not on_tensor_cores(outs[i]):
            np.testing.assert_array_equal(np.asarray(outs[i]), np.asarray(expected))
        ref, absprod = reference_product(
            xs[i], sxs[i], np.asarray(ws[i]).T if layout == "kn" else ws[i],
            np.asarray(sws[i]).T if (layout == "kn" and scaling == "block") else sws[i],
            scaling)
        assert_gemm_close(outs[i], ref, absprod)


# ---------------------------------------------------------------------------------------
# Masked groups (decoding): rows at and past masked_m[g] are zero.

@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("scaling", ["tensor", "block"])
def test_grouped_gemm_masked(device, rng, scaling, layout):
    m_max = 40
    masked_m = np.asarray([0, m_max, m_max + 5, 3, -2, 2 ** 31 - 1, 17], np.int32)
    groups = len(masked_m)
    x = on(device, randn(rng, (groups, m_max, K)))
    w = on(device, randn(rng, (groups, K, N)))
    if scaling == "tensor":
        qx, sx = fg.quantize_fp8(x)
        sx_rows = np.full(groups, np.asarray(sx))
    else:
        qx, sx = fg.quantize_fp8_fine_grained(x)
        assert sx.shape == (groups, m_max, 3)
        sx_rows = np.asarray(sx)
    qw, sw, qw_nk, sw_nk = quantize_experts(w, scaling, layout)
    out = fg.grouped_gemm_masked(qx, on(device, masked_m), qw, sx, sw, w_layout=layout)
    assert out.shape == (groups, m_max, N) and out.dtype == jnp.bfloat16
    qx_np = np.asarray(qx)
    for g in range(groups):
        rows = min(max(int(masked_m[g]), 0), m_max)  # clamped to [0, M_max]
        ref, absprod = np.zeros((m_max, N)), np.zeros((m_max, N))
        if rows:
            ref[:rows], absprod[:rows] = reference_product(
                qx_np[g, :rows], sx_rows[g] if scaling == "tensor" else sx_rows[g, :rows],
                qw_nk[g], sw_nk[g], scaling)
        assert_gemm_close(out[g], ref, absprod)
        assert (np.asarray(out[g], np.float32)[rows:] == 0).all()


def test_grouped_gemm_masked_per_group_scale_x(device, rng):
    masked_m = np.asarray([4, 9, 0], np.int32)
    x = randn(rng, (3, 9, K)) * np.asarray([1.0, 20.0, 0.5], np.float32)[:, None, None]
    pairs = [fg.quantize_fp8(on(device, x[g])) for g in range(3)]
    qx, sx = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
    qw, sw, qw_nk, sw_nk = quantize_experts(on(device, randn(rng, (3, K, N))), "tensor", "kn")
    out = fg.grouped_gemm_masked(qx, on(device, masked_m), qw, sx, sw, out_dtype=jnp.float32)
    for g in range(3):
        ref, absprod = np.zeros((9, N)), np.zeros((9, N))
        if masked_m[g]:
            ref[:masked_m[g]], absprod[:masked_m[g]] = reference_product(
                np.asarray(qx[g, :masked_m[g]]), np.asarray(sx[g]), qw_nk[g], sw_nk[g], "tensor")
        assert_gemm_close(out[g], ref, absprod)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["contiguous", "masked"])
def test_uncovered_rows_are_zeroed_in_reused_memory(rng, kind):
    """Rows that no group covers come back as zeros even when the output lands on memory a
    previous output filled: a call whose groups cover every row is freed, then a call whose
    groups cover fewer rows takes its memory (same address: XLA's GPU allocator reuses a
    freed pool buffer of the same size; where it does not within ten tries the test is
    skipped, saying so, as it is under .ci/gpu_sanitize.sh's one cudaMalloc per buffer)."""
    device = gpu_device()
    if device is None:
        pytest.skip("needs a CUDA build of jax_fp8gemm and a JAX GPU device")
    m, groups = 96, 3
    if kind == "contiguous":
        x = on(device, randn(rng, (m, K)))
        full, part = np.asarray([30, 40, 26], np.int32), np.asarray([5, 0, 20], np.int32)
        uncovered = ~rows_in_groups(part, m)
    else:
        x = on(device, randn(rng, (groups, m, K)))
        full, part = np.full(groups, m, np.int32), np.asarray([0, 50, 95], np.int32)
        uncovered = np.arange(m)[None, :] >= part[:, None]
    qx, sx = fg.quantize_fp8_fine_grained(x)
    qw, sw, _, _ = quantize_experts(on(device, randn(rng, (groups, K, N))), "block", "kn")

    def call(sizes):
        if kind == "contiguous":
            return fg.grouped_gemm(qx, qw, sx, sw, on(device, sizes))
        return fg.grouped_gemm_masked(qx, on(device, sizes), qw, sx, sw)

    reused = 0
    for _ in range(10):
        first = call(full)
        assert (np.asarray(first, np.float32) != 0).any(axis=-1).all()  # every row written
        address = first.unsafe_buffer_pointer()
        del first
        out = call(part)
        out.block_until_ready()
        if out.unsafe_buffer_pointer() == address:
            reused += 1
            assert (np.asarray(out, np.float32)[uncovered] == 0).all()
    if not reused:
        pytest.skip("the allocator never gave the freed output's memory to the next call")


# Every tile shape of the Hopper kernel (FP8GEMM_SM90_TILES), forced through
# JAX_FP8GEMM_SM90_TILE: groups that start inside a tile, end one row past a tile, hold a
# single row or nothing, and (masked) run past M_max.
SM90_TILES = ["64x16", "64x32", "64x64", "64x128", "64x192", "128x128", "128x160", "128x192",
              "256x128"]


@pytest.mark.gpu
@pytest.mark.parametrize("tile", SM90_TILES)
def test_every_sm90_tile_grouped(rng, monkeypatch, tile):
    device = hopper_device()
    monkeypatch.setenv("JAX_FP8GEMM_SM90_TILE", tile)
    sizes = np.asarray([0, 130, 1, 257, 64, 7, 0], np.int32)  # sum 459 of 470 rows
    args, ref_args = make_problem(device, rng, 470, len(sizes), "block", "nk")
    qx, sx, qw, sw = args
    out = fg.grouped_gemm(qx, qw, sx, sw, on(device, sizes), w_layout="nk", out_dtype=jnp.float32)
    ref, absprod = grouped_reference(*ref_args, sizes, "block")
    assert_gemm_close(out, ref, absprod)
    assert (np.asarray(out)[459:] == 0).all()

    m_max = 140
    masked_m = np.asarray([0, 140, 1, 65, 200], np.int32)
    x = on(device, randn(rng, (5, m_max, K)))
    qx, sx = fg.quantize_fp8_fine_grained(x)
    qw, sw, qw_nk, sw_nk = quantize_experts(on(device, randn(rng, (5, K, N))), "block", "kn")
    out = fg.grouped_gemm_masked(qx, on(device, masked_m), qw, sx, sw)
    for g in range(5):
        rows = min(int(masked_m[g]), m_max)
        ref, absprod = np.zeros((m_max, N)), np.zeros((m_max, N))
        if rows:
            ref[:rows], absprod[:rows] = reference_product(
                np.asarray(qx[g, :rows]), np.asarray(sx[g, :rows]), qw_nk[g], sw_nk[g], "block")
        assert_gemm_close(out[g], ref, absprod)
        assert (np.asarray(out[g], np.float32)[rows:] == 0).all()


# ---------------------------------------------------------------------------------------
# The fused expert MLP.

H, F = 256, 192
MOE_SIZES = np.asarray([40, 0, 70, 25], np.int32)  # sum 135 of 150 rows
MOE_ROWS = 150


def np_activation(name, h):
    silu = lambda v: v / (1 + np.exp(-v))
    # jax.nn.gelu's default, the tanh approximation.
    gelu = lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    f = h.shape[-1] // 2
    return {"swiglu": lambda: silu(h[:, :f]) * h[:, f:],
            "geglu": lambda: gelu(h[:, :f]) * h[:, f:],
            "silu": lambda: silu(h), "gelu": lambda: gelu(h),
            "relu": lambda: np.maximum(h, 0)}[name]()


def moe_reference(x, sizes, w1, w2, activation):
    x, w1, w2 = (np.asarray(v, np.float64) for v in (x, w1, w2))
    out = np.zeros((x.shape[0], w2.shape[2]))
    for g, (lo, hi) in enumerate(reference.group_ranges(sizes, x.shape[0])):
        out[lo:hi] = np_activation(activation, x[lo:hi] @ w1[g]) @ w2[g]
    return out


def moe_inputs(rng, activation, x_dtype=np.float32):
    gated = activation in ("swiglu", "geglu")
    x = randn(rng, (MOE_ROWS, H), dtype=x_dtype)
    w1 = randn(rng, (len(MOE_SIZES), H, 2 * F if gated else F), scale=H ** -0.5)
    w2 = randn(rng, (len(MOE_SIZES), F, H), scale=F ** -0.5)
    return x, w1, w2


# calc_diff against the float64 MLP: x, w1, the hidden layer and w2 are each rounded to
# e4m3, a relative error of RMS ~0.025 per value (see test_gemm), so each GEMM output is off
# by r^2 ~ 1.3e-3 relative, and the hidden layer's error carries into the second GEMM:
# r^2 ~ 2.6e-3, calc_diff ~ r^2 / 2 ~ 1.3e-3. A gated activation multiplies two such
# hidden values: ~1.8e-3. Measured over 80 seeds: medians 1.3e-3 (ungated) and 1.9e-3
# (gated), never above 2.1e-3. The BF16 path rounds to 8 significant bits: ~1e-5.
MOE_FP8_DIFF = 3e-3
MOE_BF16_DIFF = 1e-4


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "geglu", "silu", "relu"])
def test_grouped_gemm_moe(device, rng, activation):
    x, w1, w2 = moe_inputs(rng, activation)
    expected = moe_reference(x, MOE_SIZES, w1, w2, activation)
    args = on(device, x, MOE_SIZES, w1, w2)
    fp8 = fg.grouped_gemm_moe(*args, use_fp8=True, activation=activation)
    bf16 = fg.grouped_gemm_moe(*args, use_fp8=False, activation=activation)
    for out in (fp8, bf16):
        assert out.shape == (MOE_ROWS, H) and out.dtype == jnp.float32
        out = np.asarray(out)
        assert np.isfinite(out).all()
        assert (out[MOE_SIZES.sum():] == 0).all()
    assert calc_diff(fp8, expected) < MOE_FP8_DIFF
    assert calc_diff(bf16, expected) < MOE_BF16_DIFF
    assert calc_diff(fp8, bf16) < MOE_FP8_DIFF


def test_grouped_gemm_moe_bfloat16_input_and_block_size(device, rng):
    import ml_dtypes
    x, w1, w2 = moe_inputs(rng, "swiglu", x_dtype=ml_dtypes.bfloat16)
    expected = moe_reference(x, MOE_SIZES, w1, w2, "swiglu")
    out = fg.grouped_gemm_moe(*on(device, x, MOE_SIZES, w1, w2), block_size=64)
    assert out.dtype == jnp.bfloat16  # x's dtype
    assert (np.asarray(out, np.float32)[MOE_SIZES.sum():] == 0).all()
    assert calc_diff(out, expected) < MOE_FP8_DIFF
    out32 = fg.grouped_gemm_moe(*on(device, x, MOE_SIZES, w1, w2), out_dtype=jnp.float32)
    assert out32.dtype == jnp.float32
    assert calc_diff(out32, expected) < MOE_FP8_DIFF


# ---------------------------------------------------------------------------------------
# Token permutation helpers.

def test_permute_tokens_sorts_by_expert_and_round_trips(device, rng):
    t, k, e = 50, 2, 5
    ids = rng.integers(0, e - 1, (t, k)).astype(np.int32)  # expert e - 1 stays empty
    ids[3] = [-1, e]                                         # dropped: outside [0, E)
    x = on(device, randn(rng, (t, 8)))
    xs, sizes, order = jax.jit(fg.permute_tokens, static_argnums=2)(x, on(device, ids), e)
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < e)
    np.testing.assert_array_equal(np.asarray(sizes), np.bincount(flat[valid], minlength=e))
    order = np.asarray(order)
    # Stable sort by expert, dropped ids last; each row is its token's.
    np.testing.assert_array_equal(order[:valid.sum()], np.argsort(np.where(valid, flat, e),
                                                                  kind="stable")[:valid.sum()])
    assert set(order[valid.sum():]) == {6, 7}
    np.testing.assert_array_equal(np.asarray(xs), np.asarray(x)[order // k])
    # Back, weighted: rows outside every group zeroed first, as a grouped GEMM returns them.
    w = rng.uniform(0, 1, (t, k)).astype(np.float32)
    ys = np.asarray(xs).copy()
    ys[valid.sum():] = 0
    y = fg.unpermute_tokens(on(device, ys), on(device, order), on(device, w), t)
    want = (np.asarray(x)[:, None, :] * (w * valid.reshape(t, k))[:, :, None]).sum(1)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-6)


def test_permuted_grouped_matmul_equals_per_token_experts(device, rng):
    t, k, e, h, n = 40, 2, 4, 256, 128
    x = on(device, randn(rng, (t, h)))
    w = on(device, randn(rng, (e, h, n)))
    ids = on(device, rng.integers(0, e, (t, k)).astype(np.int32))
    gates = on(device, rng.uniform(0, 1, (t, k)).astype(np.float32))

    def moe(x, w, gates):
        xs, sizes, order = fg.permute_tokens(x, ids, e)
        return fg.unpermute_tokens(fg.fp8_grouped_matmul(xs, sizes, w), order, gates, t)

    y = jax.jit(moe)(x, w, gates)
    want = np.einsum("tk,tkn->tn", np.asarray(gates),
                     np.einsum("th,tkhn->tkn", np.asarray(x), np.asarray(w)[np.asarray(ids)]))
    assert calc_diff(np.asarray(y, np.float32), want) < 2e-3
    # Differentiable in x, the weights and the gates.
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(moe(*a) ** 2), argnums=(0, 1, 2)))(x, w, gates)
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
               for g in grads)


@pytest.mark.parametrize("scaling", ["tensor", "block"])
def test_odd_k_is_padded_to_16_with_the_same_result(device, rng, scaling):
    # As for the dense GEMM (test_gemm.py): with K % 16 != 0, x and w reach the primitive
    # padded with zeros to a multiple of 16 (the Hopper kernel's TMA needs it), and the
    # result is the unpadded product.
    k, sizes = 100, np.asarray([10, 0, 25], np.int32)
    x = on(device, randn(rng, (40, k)))
    w = on(device, randn(rng, (3, k, 24)))
    qx, sx, sx_ref = quantize_tokens(x, scaling, 3)
    qw, sw, qw_nk, sw_nk = quantize_experts(w, scaling, "kn")
    call = functools.partial(fg.grouped_gemm, out_dtype=jnp.float32)
    jaxpr = jax.make_jaxpr(call)(qx, qw, sx, sw, sizes)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name.endswith("grouped_contiguous")]
    assert eqn.invars[0].aval.shape[-1] == 112 and eqn.invars[2].aval.shape[-1] == 112
    out = call(qx, qw, sx, sw, on(device, sizes))
    ref, absprod = grouped_reference(qx, sx_ref, qw_nk, sw_nk, sizes, scaling)
    assert_gemm_close(out, ref, absprod)


def test_odd_k_error_names_the_callers_shapes():
    # The primitive is checked on the operands as given before K is padded, so an error
    # shows the caller's K (100), not the padded one (112).
    from jax_fp8gemm.primitives.grouped import grouped_masked
    x = jnp.zeros((1, 2, 8, 100), jnp.float8_e4m3fn)  # 2 groups where masked_m has 3
    w = jnp.zeros((1, 3, 24, 100), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"x has shape \(1, 2, 8, 100\), expected \(1, 3, 8, 100\)"):
        grouped_masked(x, jnp.zeros((1, 3), jnp.int32), w, jnp.ones((1, 3)), jnp.ones((1, 3)),
                       scale_mode="tensor", block_size=128, out_dtype=jnp.bfloat16)


# ---------------------------------------------------------------------------------------
# The k-grouped weight gradient: out[b, g] = a[b]_g @ b[b]_g^T over group g's tokens.

def kgrouped_inputs(device, rng, batch, n, k, t, block_size, fmts=("e4m3", "e4m3"),
                    poison_tokens=()):
    """a [batch, n, t] and b [batch, k, t], token-major, quantized 1 x block along the
    tokens (as the MoE backward makes them). Tokens in poison_tokens get NaN in both
    operands (outside every group, they must not reach any output)."""
    def make(rows, fmt):
        x = randn(rng, (batch, rows, t))
        q, s = fg.quantize_fp8_fine_grained(on(device, x), block_size, fmt)
        if len(poison_tokens):
            nan = np.asarray(q).copy()
            nan[:, :, list(poison_tokens)] = np.nan
            q = on(device, jnp.asarray(nan))
        return q, s
    return make(n, fmts[0]) + make(k, fmts[1])


def kgrouped_reference(qa, sa, qb, sb, sizes, block_size):
    """float64 per-(batch, group) products of the dequantized operands over the group's
    tokens (reference.group_ranges), and |a| @ |b|^T over the same tokens."""
    qa, qb = np.asarray(qa), np.asarray(qb)
    sa, sb = np.asarray(sa, np.float64), np.asarray(sb, np.float64)
    batch, n, t = qa.shape
    k, groups = qb.shape[1], sizes.shape[1]
    ref, absprod = np.zeros((batch, groups, n, k)), np.zeros((batch, groups, n, k))
    for bi in range(batch):
        da, db = dequant(qa[bi], sa[bi], 1, block_size), dequant(qb[bi], sb[bi], 1, block_size)
        for g, (lo, hi) in enumerate(reference.group_ranges(sizes[bi], t)):
            ref[bi, g] = da[:, lo:hi] @ db[:, lo:hi].T
            absprod[bi, g] = np.abs(da[:, lo:hi]) @ np.abs(db[:, lo:hi]).T
    return ref, absprod


# Token counts (t) and group sizes [batch, groups]: ranges that start and end inside a
# 128-token block, single tokens, empty groups, a sum below t (the tail's tokens belong to
# no group) and past it (cut), one group with every token, t not a multiple of 16 (padded).
KGROUPED_CASES = {
    "uneven": (2, 600, [[0, 130, 1, 257, 64, 7, 0], [300, 0, 0, 1, 127, 129, 40]]),
    "one-group": (1, 384, [[384]]),
    "sum-below-and-past": (2, 272, [[5, 100, 3], [200, 100, 50]]),
    "odd-tokens": (1, 333, [[17, 200, 100]]),
    "all-empty": (1, 256, [[0, 0]]),
}


@pytest.mark.parametrize("case", list(KGROUPED_CASES))
def test_kgrouped_matches_per_group_reference(device, rng, case):
    batch, t, sizes = KGROUPED_CASES[case]
    sizes = np.asarray(sizes, np.int32)
    qa, sa, qb, sb = kgrouped_inputs(device, rng, batch, 136, 200, t, 128)
    out = grouped_prim.grouped_kgrouped(qa, qb, on(device, sizes), sa, sb, block_size=128)
    assert out.shape == (batch, sizes.shape[1], 136, 200) and out.dtype == jnp.float32
    ref, absprod = kgrouped_reference(qa, sa, qb, sb, sizes, 128)
    assert_gemm_close(out, ref, absprod)


def test_kgrouped_accumulates_with_padded_tokens(device, rng):
    """Tokens not a multiple of 16 are padded before the primitive; the accumulator (which
    the output aliases) keeps its shape and is added once."""
    sizes = np.asarray([[40, 0, 211]], np.int32)  # 251 of 253 tokens
    qa, sa, qb, sb = kgrouped_inputs(device, rng, 1, 72, 48, 253, 64)
    acc = on(device, randn(rng, (1, 3, 72, 48), scale=10.0))
    out = grouped_prim.grouped_kgrouped(qa, qb, on(device, sizes), sa, sb, acc, block_size=64)
    ref, absprod = kgrouped_reference(qa, sa, qb, sb, sizes, 64)
    assert_gemm_close(out, ref, absprod, accumulator=acc)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [64, 128, 256])
@pytest.mark.parametrize("tile", ["64x64", "64x128", "128x128", "256x128"])
def test_every_sm90_row_scale_tile_kgrouped(rng, monkeypatch, tile, block_size):
    """The Hopper kernel's k-grouped walk on each row-scale tile: group edges at every
    offset inside a block, NaN tokens outside every group (zeroed in shared memory before
    the wgmmas read them), an accumulator, both FP8 formats, scale rows loaded by TMA (more
    than 128 rows, 16-byte aligned) and by the producer (t = 1040: 9 blocks of 128)."""
    device = hopper_device()
    monkeypatch.setenv("JAX_FP8GEMM_SM90_TILE", tile)
    sizes = np.asarray([[0, 129, 1, 250, 64, 7, 0, 300], [511, 0, 2, 100, 3, 33, 0, 1]],
                       np.int32)  # sums 751 and 650 of 1040 tokens
    t, n, k = 1040, 300, 264
    poison = [752, 800, 1039]  # past batch entry 0's groups; batch entry 1's end at 650
    with jax.default_device(device):
        qa, sa, qb, sb = kgrouped_inputs(device, rng, 2, n, k, t, block_size,
                                         fmts=("e4m3", "e5m2"), poison_tokens=poison)
        acc = on(device, randn(rng, (2, sizes.shape[1], n, k), scale=10.0))
        out = grouped_prim.grouped_kgrouped(qa, qb, on(device, sizes), sa, sb, acc,
                                            block_size=block_size)
        ref, absprod = kgrouped_reference(qa, sa, qb, sb, sizes, block_size)
        assert_gemm_close(out, ref, absprod, accumulator=acc)
        # Scale rows of 4, 8 or 16 blocks (t = 1024), more than 128 rows: TMA scales.
        sizes = np.asarray([[1000, 24]], np.int32)
        qa, sa, qb, sb = kgrouped_inputs(device, rng, 1, 300, 512, 1024, block_size)
        out = grouped_prim.grouped_kgrouped(qa, qb, on(device, sizes), sa, sb,
                                            block_size=block_size)
        ref, absprod = kgrouped_reference(qa, sa, qb, sb, sizes, block_size)
        assert_gemm_close(out, ref, absprod)
        again = grouped_prim.grouped_kgrouped(qa, qb, on(device, sizes), sa, sb,
                                              block_size=block_size)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
