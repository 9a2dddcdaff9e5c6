"""Seeded randomized tests: every public op on random configurations, against the oracle.

The number of cases comes from JAX_FP8GEMM_FUZZ_CASES (default 500), split across one test
function per op family. Each case draws its configuration from a numpy Generator seeded by
(family, case index), so a failure such as test_fuzz_grouped[cpu-37] reproduces alone, and
its assertion message prints the drawn configuration.

Quantization is compared bit for bit with jax_fp8gemm.reference (NaN-aware); GEMMs with
the element-wise bound of helpers.assert_gemm_close against the float64 product of the
same FP8 operands; rows outside every group must be exactly 0.
"""

import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fp8gemm as fg
from jax_fp8gemm import reference

from helpers import (FORMATS, assert_fp8_equal, assert_gemm_close, grouped_reference, randn,
                     reference_product, rows_in_groups)

N_CASES = int(os.environ.get("JAX_FP8GEMM_FUZZ_CASES", "500"))
# Share of the cases per family (quantize, dense, fine-grained, grouped, masked).
SHARES = {"quantize": 0.25, "gemm": 0.15, "fine": 0.25, "grouped": 0.2, "masked": 0.15}
COUNTS = dict(zip(SHARES, np.diff(np.round(np.cumsum([0] + list(SHARES.values())) * N_CASES)).astype(int)))

SIZES = (1, 2, 7, 16, 33, 64, 100, 129, 200, 257)
MAX_MNK = 2_000_000
BLOCKS = (64, 128, 256)
OUT = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
INPUTS = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
FP8_NP = {"e4m3": reference.FP8["e4m3"][0], "e5m2": reference.FP8["e5m2"][0]}


def cases(family):
    return range(COUNTS[family])


def case_rng(family, index):
    return np.random.default_rng([zlib.crc32(family.encode()), index])


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def draw_mnk(rng, limit=MAX_MNK):
    while True:
        m, n, k = (pick(rng, SIZES) for _ in range(3))
        if m * n * k <= limit:
            return m, n, k


def draw_wrapper(rng, vmap_ok=True):
    """Eager ("plain") calls compile every small op of the wrapper on its own (~20 ms each
    per new shape), so they are the rarest; vmap runs under jit for the same reason."""
    r = rng.random()
    return "plain" if r < 0.2 else ("vmap" if vmap_ok and r >= 0.65 else "jit")


def wrap(fn, wrapper, in_axes=None):
    """fn under the wrapper; for "vmap", jit of fn mapped over a leading axis of 2."""
    if wrapper == "jit":
        return jax.jit(fn)
    if wrapper == "vmap":
        return jax.jit(jax.vmap(fn, in_axes=in_axes))
    return fn


def fail(cfg):
    return f"fuzz case {cfg}"


def check(cfg, fn, *args, **kwargs):
    """Runs an assertion, prefixing any failure with the case's configuration."""
    try:
        fn(*args, **kwargs)
    except AssertionError as e:
        raise AssertionError(f"{fail(cfg)}: {e}") from None


def specials(rng, x, cfg):
    """Sometimes plants a NaN, an inf, all-zero rows or tiny / huge values in x (float32)."""
    kind = pick(rng, ("none",) * 5 + ("nan", "inf", "zeros", "tiny", "huge"))
    cfg["specials"] = kind
    flat = x.reshape(-1)
    if kind == "nan" and flat.size:
        flat[rng.integers(flat.size)] = np.nan
    elif kind == "inf" and flat.size:
        flat[rng.integers(flat.size)] = pick(rng, (np.inf, -np.inf))
    elif kind == "zeros" and x.ndim >= 1:
        x[..., : max(1, x.shape[-1] // 2)] = 0
    elif kind == "tiny":
        x *= np.float32(1e-30)
    elif kind == "huge":
        x *= np.float32(1e30)
    return x


# ---------------------------------------------------------------------------------------
# Quantization.

def ref_quantize(x32, cfg):
    """(q, scales) the oracle gives for one (unbatched) input."""
    fmt, mode = cfg["fmt"], cfg["mode"]
    if mode == "tensor":
        return reference.quantize_tensor(x32, fmt)
    bs = cfg["bs"]
    if cfg["transpose"]:
        x32 = np.swapaxes(x32, -1, -2)
    if mode == "1xbs":
        return reference.quantize_rows(x32, bs, fmt)
    lead = x32.shape[:-2]
    flat = x32.reshape((-1,) + x32.shape[-2:])
    qs, ss = zip(*(reference.quantize_blocks(m, bs, bs, fmt) for m in flat))
    q, s = np.stack(qs), np.stack(ss)
    return q.reshape(lead + q.shape[1:]), s.reshape(lead + s.shape[1:])


@pytest.mark.parametrize("case", cases("quantize"))
def test_fuzz_quantize(device, case):
    rng = case_rng("quantize", case)
    mode = pick(rng, ("tensor", "1xbs", "bsxbs"))
    transpose = mode != "tensor" and bool(rng.integers(2))
    min_rank = 1 if mode == "tensor" or (mode == "1xbs" and not transpose) else 2
    rank = int(rng.integers(min_rank, 4))
    shape = [pick(rng, SIZES) for _ in range(rank)]
    while np.prod(shape) > 200_000:
        shape[int(np.argmax(shape))] //= 2
    cfg = dict(case=case, mode=mode, transpose=transpose, shape=tuple(shape),
               fmt=pick(rng, FORMATS), bs=pick(rng, BLOCKS), input=pick(rng, tuple(INPUTS)),
               wrapper=draw_wrapper(rng))
    vmapped = cfg["wrapper"] == "vmap"
    full = (2,) + tuple(shape) if vmapped else tuple(shape)
    x = specials(rng, randn(rng, full, scale=float(10.0 ** rng.uniform(-3, 3))), cfg)
    with np.errstate(over="ignore"):  # huge values overflow float16 to inf: fine, inf is tested too
        x = x.astype(INPUTS[cfg["input"]])
    x32 = np.asarray(x, np.float32)  # exact: every input dtype widens exactly

    if mode == "tensor":
        fn = lambda v: fg.quantize_fp8(v, cfg["fmt"])  # noqa: E731
    else:
        block_shape = (1, cfg["bs"]) if mode == "1xbs" else (cfg["bs"], cfg["bs"])
        fn = lambda v: fg.quantize_fp8_fine_grained(  # noqa: E731
            v, cfg["bs"], cfg["fmt"], block_shape=block_shape, transpose=transpose)
    q, s = wrap(fn, cfg["wrapper"], 0)(jnp.asarray(x))
    q, s = np.asarray(q), np.asarray(s)
    for i in range(2 if vmapped else 1):
        qi, si = (q[i], s[i]) if vmapped else (q, s)
        eq, es = ref_quantize(x32[i] if vmapped else x32, cfg)
        check(cfg, assert_fp8_equal, qi, eq)
        check(cfg, np.testing.assert_array_equal, si, np.asarray(es, np.float32),
              err_msg="scales differ")
        assert si.dtype == np.float32, fail(cfg)


# ---------------------------------------------------------------------------------------
# Dense GEMMs. Operands are quantized with the oracle (cheap, and independent of the
# quantization kernels the family above checks).

def ref_rows(x, bs, fmt):
    return reference.quantize_rows(x, bs, fmt)


def ref_blocks(x, bs, fmt):
    return reference.quantize_blocks(x, bs, bs, fmt)


def operand(rng, shape):
    return randn(rng, shape, scale=float(10.0 ** rng.uniform(-2, 2)))


@pytest.mark.parametrize("case", cases("gemm"))
def test_fuzz_fp8_gemm(device, case):
    rng = case_rng("gemm", case)
    m, n, k = draw_mnk(rng)
    cfg = dict(case=case, m=m, n=n, k=k, fmt_a=pick(rng, FORMATS), fmt_b=pick(rng, FORMATS),
               out=pick(rng, tuple(OUT)), layout=pick(rng, ("kn", "nk")),
               wrapper=draw_wrapper(rng, m * n * k <= MAX_MNK // 2))
    batch = 2 if cfg["wrapper"] == "vmap" else 1
    qa, sa = zip(*(reference.quantize_tensor(operand(rng, (m, k)), cfg["fmt_a"]) for _ in range(batch)))
    qb_nk, sb = reference.quantize_tensor(operand(rng, (n, k)), cfg["fmt_b"])
    b = qb_nk.T if cfg["layout"] == "kn" else qb_nk
    fn = lambda a_, b_, sa_, sb_: fg.fp8_gemm(  # noqa: E731
        a_, b_, sa_, sb_, OUT[cfg["out"]], b_layout=cfg["layout"])
    if batch == 2:
        out = wrap(fn, "vmap", (0, None, 0, None))(np.stack(qa), b, np.stack(sa), sb)
    else:
        out = wrap(fn, cfg["wrapper"])(qa[0], b, sa[0], sb)
        out = out[None]
    out = np.asarray(out)  # on the default device: assert_gemm_close picks its bound from it
    assert out.dtype == OUT[cfg["out"]], fail(cfg)
    for i in range(batch):
        ref, absprod = reference_product(qa[i], sa[i], qb_nk, sb, "tensor")
        check(cfg, assert_gemm_close, out[i], ref, absprod)


@pytest.mark.parametrize("case", cases("fine"))
def test_fuzz_fp8_gemm_fine_grained(device, case):
    rng = case_rng("fine", case)
    m, n, k = draw_mnk(rng)
    cfg = dict(case=case, m=m, n=n, k=k, fmt_a=pick(rng, FORMATS), fmt_b=pick(rng, FORMATS),
               bs=pick(rng, BLOCKS), b_scaling=pick(rng, ("block", "row")),
               layout=pick(rng, ("kn", "nk")), accumulate=bool(rng.integers(2)),
               wrapper=draw_wrapper(rng, m * n * k <= MAX_MNK // 2))
    cfg["out"] = "float32" if cfg["accumulate"] else pick(rng, tuple(OUT))
    bs = cfg["bs"]
    batch = 2 if cfg["wrapper"] == "vmap" else 1
    qa, sa = ref_rows(operand(rng, (batch, m, k)), bs, cfg["fmt_a"])
    b32 = operand(rng, (n, k))
    quant_b = ref_blocks if cfg["b_scaling"] == "block" else ref_rows
    qb_nk, sb_nk = quant_b(b32, bs, cfg["fmt_b"])
    b, sb = (qb_nk.T, sb_nk.T) if cfg["layout"] == "kn" else (qb_nk, sb_nk)
    acc = operand(rng, (batch, m, n)) if cfg["accumulate"] else None

    def fn(a_, b_, sa_, sb_, acc_):
        return fg.fp8_gemm_fine_grained(a_, b_, sa_, sb_, bs, OUT[cfg["out"]], b_layout=cfg["layout"],
                                        b_scaling=cfg["b_scaling"], accumulator=acc_)
    if batch == 2:
        out = wrap(fn, "vmap", (0, None, 0, None, None if acc is None else 0))(qa, b, sa, sb, acc)
    else:
        out = wrap(fn, cfg["wrapper"])(qa[0], b, sa[0], sb, None if acc is None else acc[0])[None]
    out = np.asarray(out)
    assert out.dtype == OUT[cfg["out"]], fail(cfg)
    for i in range(batch):
        ref, absprod = reference_product(qa[i], sa[i], qb_nk, sb_nk, cfg["b_scaling"], bs)
        check(cfg, assert_gemm_close, out[i], ref, absprod, None if acc is None else acc[i])


# ---------------------------------------------------------------------------------------
# Grouped GEMMs.

def draw_sizes(rng, g, m, cfg):
    """A group-size vector of one of several kinds, for g groups over m rows."""
    kind = pick(rng, ("exact", "below", "zeros", "one_group", "over", "negative"))
    cfg["sizes_kind"] = kind
    if kind == "zeros":
        sizes = np.zeros(g, np.int64)
    elif kind == "one_group":
        sizes = np.zeros(g, np.int64)
        sizes[rng.integers(g)] = m
    else:
        total = {"exact": m, "below": int(rng.integers(0, m)) if m else 0,
                 "over": m + int(rng.integers(1, 20)), "negative": m}[kind]
        cuts = np.sort(rng.integers(0, total + 1, g - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [total]]))
        if kind == "negative":
            sizes[rng.integers(g)] = -int(rng.integers(1, 50))
    return sizes.astype(np.int32)


def grouped_weights(rng, g, n, k, cfg):
    """(w as passed, scale_w as passed, qw_nk [G, N, K], sw_nk for grouped_reference)."""
    w32 = operand(rng, (g, n, k))
    if cfg["scales"] == "tensor":
        qs, ss = zip(*(reference.quantize_tensor(w, cfg["fmt_w"]) for w in w32))
        qw_nk, sw_nk = np.stack(qs), np.asarray(ss, np.float32)
        sw = sw_nk
    else:
        qs, ss = zip(*(ref_blocks(w, cfg["bs"], cfg["fmt_w"]) for w in w32))
        qw_nk, sw_nk = np.stack(qs), np.stack(ss)
        sw = np.swapaxes(sw_nk, 1, 2) if cfg["layout"] == "kn" else sw_nk
    w = np.swapaxes(qw_nk, 1, 2) if cfg["layout"] == "kn" else qw_nk
    return w, sw, qw_nk, sw_nk


def grouped_cfg(rng, family, case, limit):
    m, n, k = draw_mnk(rng, limit)
    g = int(rng.integers(1, 7))
    return dict(case=case, m=m, n=n, k=k, g=g, fmt_x=pick(rng, FORMATS), fmt_w=pick(rng, FORMATS),
                scales=pick(rng, ("tensor", "block")), bs=pick(rng, BLOCKS),
                layout=pick(rng, ("kn", "nk")), out=pick(rng, tuple(OUT)),
                scale_x=pick(rng, ("scalar", "per-group")), wrapper=draw_wrapper(rng))


def grouped_x(rng, rows_shape, k, g, cfg):
    """x [..., K] quantized and its scales as the grouped GEMMs take them; per-tensor
    scale_x is a scalar or one scale per group."""
    x32 = operand(rng, rows_shape + (k,))
    if cfg["scales"] == "block":
        return ref_rows(x32, cfg["bs"], cfg["fmt_x"])
    q, s = reference.quantize_tensor(x32, cfg["fmt_x"])
    if cfg["scale_x"] == "per-group":
        return q, (s * rng.uniform(0.5, 2, g)).astype(np.float32)
    return q, s


@pytest.mark.parametrize("case", cases("grouped"))
def test_fuzz_grouped_gemm(device, case):
    rng = case_rng("grouped", case)
    cfg = grouped_cfg(rng, "grouped", case, MAX_MNK // 6)
    m, n, k, g, bs = cfg["m"], cfg["n"], cfg["k"], cfg["g"], cfg["bs"]
    batch = 2 if cfg["wrapper"] == "vmap" else 1
    w, sw, qw_nk, sw_nk = grouped_weights(rng, g, n, k, cfg)
    xs = [grouped_x(rng, (m,), k, g, cfg) for _ in range(batch)]
    sizes = [draw_sizes(rng, g, m, cfg) for _ in range(batch)]
    cfg["group_sizes"] = [s.tolist() for s in sizes]

    def fn(x_, sx_, sizes_):
        return fg.grouped_gemm(x_, w, sx_, sw, sizes_, out_dtype=OUT[cfg["out"]], block_size=bs,
                               w_layout=cfg["layout"])
    if batch == 2:
        out = wrap(fn, "vmap", 0)(np.stack([q for q, _ in xs]),
                                  np.stack([np.broadcast_to(s, np.shape(xs[0][1])) for _, s in xs]),
                                  np.stack(sizes))
    else:
        out = wrap(fn, cfg["wrapper"])(xs[0][0], xs[0][1], sizes[0])[None]
    out = np.asarray(out)
    assert out.dtype == OUT[cfg["out"]] and out.shape == (batch, m, n), fail(cfg)
    for i in range(batch):
        qx, sx = xs[i]
        sx_ref = np.broadcast_to(sx, (g,)) if cfg["scales"] == "tensor" else sx
        if cfg["scales"] == "block":
            cfg.pop("scale_x", None)
        ref, absprod = grouped_reference(qx, sx_ref, qw_nk, sw_nk, sizes[i], cfg["scales"], bs)
        outside = ~rows_in_groups(sizes[i], m)
        oi = out[i]
        assert (oi[outside] == 0).all(), f"{fail(cfg)}: rows outside every group are not 0"
        check(cfg, assert_gemm_close, out[i], ref, absprod)


@pytest.mark.parametrize("case", cases("masked"))
def test_fuzz_grouped_gemm_masked(device, case):
    rng = case_rng("masked", case)
    cfg = grouped_cfg(rng, "masked", case, MAX_MNK // 6)
    m, n, k, g, bs = cfg["m"], cfg["n"], cfg["k"], cfg["g"], cfg["bs"]
    batch = 2 if cfg["wrapper"] == "vmap" else 1
    w, sw, qw_nk, sw_nk = grouped_weights(rng, g, n, k, cfg)
    xs = [grouped_x(rng, (g, m), k, g, cfg) for _ in range(batch)]
    masked = [rng.integers(-2, m + 4, g).astype(np.int32) for _ in range(batch)]
    for mm in masked:  # make the edge values common
        mm[rng.random(g) < 0.3] = pick(rng, (0, m))
    cfg["masked_m"] = [mm.tolist() for mm in masked]

    def fn(x_, sx_, mm_):
        return fg.grouped_gemm_masked(x_, mm_, w, sx_, sw, out_dtype=OUT[cfg["out"]],
                                      block_size=bs, w_layout=cfg["layout"])
    if batch == 2:
        out = wrap(fn, "vmap", 0)(np.stack([q for q, _ in xs]),
                                  np.stack([np.broadcast_to(s, np.shape(xs[0][1])) for _, s in xs]),
                                  np.stack(masked))
    else:
        out = wrap(fn, cfg["wrapper"])(xs[0][0], xs[0][1], masked[0])[None]
    out = np.asarray(out)
    assert out.dtype == OUT[cfg["out"]] and out.shape == (batch, g, m, n), fail(cfg)
    for i in range(batch):
        qx, sx = xs[i]
        oi = out[i]
        for j in range(g):
            rows = min(max(int(masked[i][j]), 0), m)
            assert (oi[j, rows:] == 0).all(), f"{fail(cfg)}: group {j} rows past masked_m are not 0"
            if rows:
                sxj = (sx[j, :rows] if cfg["scales"] == "block"
                       else np.broadcast_to(sx, (g,))[j])
                ref, absprod = reference_product(qx[j, :rows], sxj, qw_nk[j], sw_nk[j],
                                                 cfg["scales"], bs)
                check(dict(cfg, group=j), assert_gemm_close, out[i, j, :rows], ref, absprod)
