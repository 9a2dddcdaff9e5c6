"""`python -m jax_fp8gemm.bench grouped`: the MoE grouped GEMMs beside their alternatives.

Workloads (../shared/ANCHORS.md's, and the usage guide's MoE example):

  contiguous  G groups of about `rows` rows each (sizes drawn uniformly in 0.7x-1.3x of the
              nominal size, then scaled so that they sum to G * rows), x [G * rows, K],
              weights [G, N, K]
  masked      G groups of an M_max-row buffer each, masked_m drawn in 0.7x-1.0x of M_max
  moe         the usage guide's example: 8 experts, hidden 2048, 1024 tokens top-1 routed
              (sizes drawn as for contiguous), ffn 1024

Implementations, timed in one run on the same group sizes:

  ours          grouped_gemm (contiguous) or grouped_gemm_masked (masked): FP8, 1 x 128
                activation scales, 128 x 128 weight scales, bf16 out, sizes on the device
  ragged-bf16   jax.lax.ragged_dot on bf16 operands (what JAX users have today)
  ragged-fp8    jax.lax.ragged_dot on float8_e4m3fn operands, bf16 out (scales left out)
  padded        every group padded to the largest one (known on the host), then one
                batched FP8 GEMM (jax.vmap of fp8_gemm_fine_grained): the usage guide's
                "Padded GEMM"; for masked workloads it is the masked buffer itself

Rates count the useful FLOPs only, 2 * (rows in groups) * N * K, for every column. Timing
is bench.py's (rotated input sets, the slope of two jitted programs; see its docstring).
Accuracy: ours against ragged-bf16's float32 product of the same (dequantized) operands,
by calc_diff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_fp8gemm as fg

from . import bench as B

BF16, F32 = jnp.bfloat16, jnp.float32

# (name, kind, groups, rows per group (nominal, or M_max), N, K)
WORKLOADS = [
    ("contig-4x8192-n4096-k7168", "contiguous", 4, 8192, 4096, 7168),
    ("contig-4x8192-n7168-k2048", "contiguous", 4, 8192, 7168, 2048),
    ("contig-8x4096-n4096-k7168", "contiguous", 8, 4096, 4096, 7168),
    ("contig-8x4096-n7168-k2048", "contiguous", 8, 4096, 7168, 2048),
    ("contig-8x128-n4096-k2048", "contiguous", 8, 128, 4096, 2048),
    ("contig-32x256-n4096-k7168", "contiguous", 32, 256, 4096, 7168),
    ("masked-1x1024-n4096-k7168", "masked", 1, 1024, 4096, 7168),
    ("masked-2x512-n7168-k2048", "masked", 2, 512, 7168, 2048),
    ("masked-4x256-n4096-k7168", "masked", 4, 256, 4096, 7168),
    ("masked-16x64-n7168-k2048", "masked", 16, 64, 7168, 2048),
    ("moe-8x128-n1024-k2048", "contiguous", 8, 128, 1024, 2048),
]
QUICK = [
    ("quick-contig-3x40-n64-k256", "contiguous", 3, 40, 64, 256),
    ("quick-masked-2x32-n64-k256", "masked", 2, 32, 64, 256),
]
IMPLS = ("ours", "ragged_bf16", "ragged_fp8", "padded")
LABELS = {"ours": "ours", "ragged_bf16": "ragged-bf16", "ragged_fp8": "ragged-fp8",
          "padded": "padded"}


def group_sizes(kind, groups, rows, rng):
    """Contiguous: sizes in 0.7x-1.3x of rows, summing to groups * rows. Masked: 0.7x-1x."""
    if kind == "masked":
        return np.round(rng.uniform(0.7, 1.0, groups) * rows).astype(np.int32)
    raw = rng.uniform(0.7, 1.3, groups)
    sizes = np.floor(raw / raw.sum() * groups * rows).astype(np.int32)
    sizes[np.argmax(sizes)] += groups * rows - sizes.sum()
    return sizes


def _quantize(x, w):
    """x [M, K] bf16 -> 1 x 128; w [G, N, K] bf16 -> 128 x 128 per group."""
    qx, sx = fg.quantize_fp8_fine_grained(x)
    qw, sw = jax.vmap(lambda wg: fg.quantize_fp8_fine_grained(wg, block_shape=(128, 128)))(w)
    return qx, sx, qw, sw


def _dequant_x(qx, sx):
    m, k = qx.shape
    s = jnp.repeat(sx, 128, axis=-1)[:, :k]
    return (qx.astype(F32) * s).astype(BF16)


# The alternatives, the same for both layouts (their operands differ: see each prep).
COMPETITORS = dict(
    ragged_bf16=lambda x, w_kn, sizes: lax.ragged_dot(x, w_kn, sizes),
    ragged_fp8=lambda qx, qw_kn, sizes: lax.ragged_dot(qx, qw_kn, sizes,
                                                       preferred_element_type=BF16),
    # [G, rows, K] x [G, N, K]: one batched FP8 GEMM over the padded (or masked) buffer.
    padded=lambda qx, sx, qw, sw: jax.vmap(
        lambda a, sa, b, sb: fg.fp8_gemm_fine_grained(a, b, sa, sb, b_layout="nk"))(
            qx, sx, qw, sw),
)


def _contiguous_fns(sizes_np, padded_rows):
    """Functions of (x bf16 [M, K], w bf16 [G, N, K], sizes [G]) for each implementation;
    operands are prepared (quantized) outside the timed functions."""
    starts = np.concatenate([[0], np.cumsum(sizes_np)[:-1]])

    def prep(x, w, sizes):
        qx, sx, qw, sw = _quantize(x, w)
        return dict(
            ours=(qx, sx, qw, sw, sizes),
            ragged_bf16=(x, jnp.swapaxes(w, 1, 2), sizes),
            ragged_fp8=(qx, jnp.swapaxes(qw, 1, 2), sizes),
            padded=(_pad(qx, sizes_np, starts, padded_rows), _pad(sx, sizes_np, starts, padded_rows),
                    qw, sw))

    fns = dict(
        ours=lambda qx, sx, qw, sw, sizes: fg.grouped_gemm(qx, qw, sx, sw, sizes, w_layout="nk"),
        **COMPETITORS,
    )
    return prep, fns


def _pad(x, sizes, starts, rows):
    """[M, ...] -> [G, rows, ...]: group g's rows at the top of slice g, zeros below."""
    out = []
    for s, n in zip(starts, sizes):
        part = x[int(s):int(s) + int(n)]
        out.append(jnp.pad(part, [(0, rows - int(n))] + [(0, 0)] * (x.ndim - 1)))
    return jnp.stack(out)


def _masked_fns(groups, m_max):
    def prep(x, w, sizes):  # x [G * M_max, K]
        qx, sx, qw, sw = _quantize(x, w)
        k = x.shape[1]
        qx3, sx3 = qx.reshape(groups, m_max, k), sx.reshape(groups, m_max, -1)
        # ragged_dot sees the masked buffer as contiguous groups of M_max rows whose first
        # masked_m rows count: it computes every row (it has no mask), like padded.
        full = jnp.full((groups,), m_max, jnp.int32)
        return dict(
            ours=(qx3, sx3, qw, sw, sizes),
            ragged_bf16=(x, jnp.swapaxes(w, 1, 2), full),
            ragged_fp8=(qx, jnp.swapaxes(qw, 1, 2), full),
            padded=(qx3, sx3, qw, sw))

    fns = dict(
        ours=lambda qx, sx, qw, sw, sizes: fg.grouped_gemm_masked(qx, sizes, qw, sx, sw,
                                                                  w_layout="nk"),
        **COMPETITORS,
    )
    return prep, fns


def _rows_of(out, kind, sizes_np, m_max):
    """The useful rows of an output, as [rows, N] float32 (contiguous or masked layout)."""
    out = np.asarray(out, np.float32)
    if kind == "masked" and out.ndim == 3:
        return np.concatenate([out[g, :n] for g, n in enumerate(sizes_np)])
    if kind == "masked":  # ragged over the masked buffer, [G * M_max, N]
        return np.concatenate([out[g * m_max:g * m_max + n] for g, n in enumerate(sizes_np)])
    if out.ndim == 3:  # padded
        return np.concatenate([out[g, :n] for g, n in enumerate(sizes_np)])
    return out[: int(sizes_np.sum())]


def bench_workload(wl, args, timer):
    name, kind, groups, rows, n, k = wl
    rng = np.random.default_rng(args.seed)
    sizes_np = group_sizes(kind, groups, rows, rng)
    useful = int(sizes_np.sum())
    flops = 2.0 * useful * n * k
    m_total = groups * rows
    key = jax.random.key(args.seed)
    make = jax.jit(lambda key: (jax.random.normal(jax.random.fold_in(key, 0), (m_total, k), BF16),
                                jax.random.normal(jax.random.fold_in(key, 1), (groups, n, k), BF16)))
    if kind == "masked":
        prep, fns = _masked_fns(groups, rows)
    else:
        prep, fns = _contiguous_fns(sizes_np, int(sizes_np.max()))
    sizes = jnp.asarray(sizes_np)
    nbytes = m_total * k + groups * n * k + 2 * m_total * n
    count = B._num_sets(args, nbytes)
    sets = [prep(*make(jax.random.fold_in(key, i)), sizes) for i in range(count)]
    row = dict(name=name, kind=kind, groups=groups, rows=rows, n=n, k=k,
               sizes=sizes_np.tolist(), useful_rows=useful, flops=flops, impls={})
    outs = {}
    for impl in args.impls:
        impl_sets = tuple(tuple(s[impl]) for s in sets)
        try:
            res = timer.rotated(fns[impl], impl_sets)
        except Exception as e:  # noqa: BLE001 - report and go on with the other columns
            B._log(f"  {LABELS[impl]}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            row["impls"][impl] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            continue
        res["tflops"] = flops / res["s"] / 1e12
        row["impls"][impl] = res
        outs[impl] = _rows_of(jax.jit(fns[impl])(*impl_sets[0]), kind, sizes_np, rows)
    if "ours" in outs:
        # Reference: the float32 product of the dequantized operands, group by group.
        qx, sx, qw, sw = sets[0]["ours"][:4]
        x = np.asarray(_dequant_x(qx.reshape(m_total, k), sx.reshape(m_total, -1)), np.float32)
        ref, start = [], 0
        for g, cnt in enumerate(sizes_np):
            base = g * rows if kind == "masked" else start
            wg = np.asarray(fg.dequantize(qw[g], sw[g], 128), np.float32)
            ref.append(x[base:base + cnt] @ wg.T)
            start += cnt
        ref = np.concatenate(ref)
        row["calc_diff"] = {impl: float(B.calc_diff(jnp.asarray(o), jnp.asarray(ref)))
                            for impl, o in outs.items() if impl != "ragged_bf16"}
    return row


def _table(rows):
    head = ["workload", "rows", *[LABELS[i] for i in IMPLS], "ours/ragged-bf16",
            "ours/padded", "calc_diff(ours)"]
    lines = ["  ".join(f"{h:>16}" if i else f"{h:<28}" for i, h in enumerate(head))]
    for r in rows:
        rate = {i: r["impls"].get(i, {}).get("tflops") for i in IMPLS}
        cells = [f"{r['name']:<28}", f"{r['useful_rows']:>16}"]
        cells += [f"{B._fmt_rate(rate[i]):>16}" for i in IMPLS]
        cells += [f"{B._fmt_ratio(B._ratio(rate['ours'], rate['ragged_bf16'])):>16}",
                  f"{B._fmt_ratio(B._ratio(rate['ours'], rate['padded'])):>16}",
                  f"{B._fmt_diff(r.get('calc_diff', {}).get('ours')):>16}"]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def run_grouped(args):
    dev = jax.devices()[0]
    B._log(f"jax {jax.__version__}, device {getattr(dev, 'device_kind', dev.platform)}; "
           f"jax_fp8gemm {fg.__version__}; native FP8 kernels: {fg.has_fp8_support()}")
    workloads = QUICK if args.quick else WORKLOADS
    if args.workloads:
        workloads = [w for w in WORKLOADS + QUICK if any(s in w[0] for s in args.workloads)]
    timer = B.Timer(args)
    rows = []
    for i, wl in enumerate(workloads):
        row = bench_workload(wl, args, timer)
        rows.append(row)
        rates = "  ".join(f"{LABELS[k]} {B._fmt_rate(v.get('tflops'))}"
                          for k, v in row["impls"].items())
        B._log(f"[{i + 1}/{len(workloads)}] {wl[0]}: {rates} TFLOP/s")
    print()
    print(_table(rows))
    contig = [r for r in rows if r["kind"] == "contiguous" and r["groups"] * r["rows"] >= 16384]
    ratios = [B._ratio(r["impls"].get("ours", {}).get("tflops"),
                       r["impls"].get("ragged_bf16", {}).get("tflops")) for r in contig]
    print(f"ours / ragged_dot BF16, geometric mean over the large contiguous workloads: "
          f"{B._fmt_ratio(B._geomean(ratios))}")
    if args.json:
        B.dump_json(args.json, dict(rows=rows))
    return 0


def add_parser(sub):
    p = sub.add_parser("grouped", help="MoE grouped GEMMs: ours vs jax.lax.ragged_dot (BF16, "
                                       "FP8) and a padded batched GEMM",
                       description=__doc__, formatter_class=B.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two tiny workloads: seconds on a CPU")
    p.add_argument("--workloads", nargs="+", metavar="NAME",
                   help="substrings of workload names to run (default: all)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--json", default="bench_grouped.json")
    B.add_timing_args(p, max_sets=8, target_calls=32, max_program_s=0.05)
    p.set_defaults(func=run_grouped)
