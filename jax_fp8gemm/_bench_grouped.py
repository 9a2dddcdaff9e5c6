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
  DeepGEMM      deep_gemm.m_grouped_fp8_gemm_nt_contiguous / _masked on ours' quantized
                operands, when `import deep_gemm` works on a CUDA GPU (never a
                dependency; bench.py says how it is set up). It gets the layout it asks for:
                contiguous groups each padded to its row alignment
                (get_mk_alignment_for_contiguous_layout(), 128 on the H200), padding rows
                zero and marked -1 in m_indices; masked as our masked buffer. A's scales
                are put once, outside the timed region, into its MN-major TMA-aligned
                layout. Timed as its tests do (deep_gemm.testing.bench_kineto: the
                profiler's kernel time, L2 flushed before each call), after every JAX
                measurement (the JSON holds the JAX figures before it starts: a crash in
                its first call, see bench.py on LD_PRELOAD, loses only its column); its
                output's useful rows must match ours (calc_diff < 1e-3, else the summary
                names the workload).

Rates count the useful FLOPs only, 2 * (rows in groups) * N * K, for every column. Timing
is bench.py's (rotated input sets, the slope of two jitted programs; see its docstring).
The summary prints the MoE issue's ratios: ours / DeepGEMM (geometric means over the four
large contiguous and the four masked workloads), ours / ragged_dot BF16 (large contiguous)
and ours / padded on the usage guide's MoE example.
Accuracy: ours against ragged-bf16's float32 product of the same (dequantized) operands,
by calc_diff.
"""

from __future__ import annotations

import sys

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
_MAIN_NAMES = {w[0] for w in WORKLOADS}  # the summary's ratios leave the quick ones out
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


def _setup(wl, args):
    """A workload's group sizes, and its input set i as each implementation's operands."""
    name, kind, groups, rows, n, k = wl
    sizes_np = group_sizes(kind, groups, rows, np.random.default_rng(args.seed))
    m_total = groups * rows
    key = jax.random.key(args.seed)
    make = jax.jit(lambda key: (jax.random.normal(jax.random.fold_in(key, 0), (m_total, k), BF16),
                                jax.random.normal(jax.random.fold_in(key, 1), (groups, n, k), BF16)))
    if kind == "masked":
        prep, fns = _masked_fns(groups, rows)
    else:
        prep, fns = _contiguous_fns(sizes_np, int(sizes_np.max()))
    sizes = jnp.asarray(sizes_np)
    return sizes_np, fns, lambda i: prep(*make(jax.random.fold_in(key, i)), sizes)


def bench_workload(wl, args, timer):
    name, kind, groups, rows, n, k = wl
    sizes_np, fns, make_set = _setup(wl, args)
    useful = int(sizes_np.sum())
    flops = 2.0 * useful * n * k
    m_total = groups * rows
    nbytes = m_total * k + groups * n * k + 2 * m_total * n
    count = B._num_sets(args, nbytes)
    sets = [make_set(i) for i in range(count)]
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


class DeepGEMMGrouped:
    """DeepGEMM's m-grouped kernels (contiguous and masked) on ours' quantized operands."""

    def __init__(self, dg, torch):
        self.dg, self.torch = dg, torch
        self.bench_kineto = B.load_bench_kineto()

    def _contiguous(self, qx, sx, qw, sw, sizes):
        """Each group's rows copied to the start of its own aligned block of rows; the
        padding rows are zero, with -1 in m_indices. Returns the call, a function giving
        the useful rows of its output, and the padded row count."""
        torch, dg = self.torch, self.dg
        align = dg.get_mk_alignment_for_contiguous_layout()
        padded = [-(-int(c) // align) * align for c in sizes]
        src, dst, ids, start, at = [], [], [], 0, 0
        for g, (c, p) in enumerate(zip(sizes, padded)):
            src.append(np.arange(start, start + c))
            dst.append(np.arange(at, at + c))
            ids.append(np.full(c, g))
            start, at = start + c, at + p
        src, dst = (torch.from_numpy(np.concatenate(v)).cuda() for v in (src, dst))
        m_pad, k = at, qx.shape[1]
        a = torch.zeros((m_pad, k), dtype=torch.uint8, device="cuda")
        a[dst] = qx.view(torch.uint8)[src]
        sa = torch.ones((m_pad, sx.shape[1]), dtype=torch.float32, device="cuda")
        sa[dst] = sx[src]
        m_indices = torch.full((m_pad,), -1, dtype=torch.int32, device="cuda")
        m_indices[dst] = torch.from_numpy(np.concatenate(ids).astype(np.int32)).cuda()
        a, sa = a.view(torch.float8_e4m3fn), dg.get_mn_major_tma_aligned_tensor(sa)
        d = torch.empty((m_pad, qw.shape[1]), dtype=torch.bfloat16, device="cuda")

        def call():
            dg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (qw, sw), d, m_indices,
                                                disable_ue8m0_cast=True)
        return call, lambda: d[dst], m_pad

    def _masked(self, qx, sx, qw, sw, sizes):
        torch, dg = self.torch, self.dg
        sa = dg.get_mn_major_tma_aligned_tensor(sx)
        masked_m = torch.tensor(np.asarray(sizes, np.int32), device="cuda")
        expected_m = max(1, -(-int(sum(sizes)) // len(sizes)))
        d = torch.empty((qx.shape[0], qx.shape[1], qw.shape[1]), dtype=torch.bfloat16,
                        device="cuda")

        def call():
            dg.m_grouped_fp8_gemm_nt_masked((qx, sa), (qw, sw), d, masked_m, expected_m,
                                            disable_ue8m0_cast=True)
        return call, lambda: torch.cat([d[g, :int(c)] for g, c in enumerate(sizes)]), None

    def measure(self, row, operands, ours_rows):
        torch = self.torch
        qx, sx, qw, sw = (B._to_torch(v, torch) for v in operands)
        build = self._masked if row["kind"] == "masked" else self._contiguous
        call, useful_rows, m_pad = build(qx, sx, qw, sw, row["sizes"])
        torch.cuda.synchronize()
        call()
        torch.cuda.synchronize()
        diff = B.calc_diff(jax.dlpack.from_dlpack(useful_rows().contiguous()), ours_rows)
        t = None
        if self.bench_kineto is not None:
            try:
                t = self.bench_kineto(call, "gemm_", suppress_kineto_output=True)
            except Exception as e:  # noqa: BLE001
                B._log(f"  DeepGEMM bench_kineto failed ({e!r}); using CUDA events")
        method = "kineto kernel time, L2 flushed before each call (its tests)"
        if t is None or not t > 0:
            t = B.events_flushed(torch, call)
            method = "CUDA events, L2 flushed before each call"
        res = dict(s=t, tflops=row["flops"] / t / 1e12, diff_vs_ours=diff, method=method)
        if m_pad is not None:
            res["padded_rows"] = m_pad
        torch.cuda.empty_cache()
        return res


def deepgemm_phase(rows, workloads, args):
    """DeepGEMM beside the JAX figures, after all of them: a column per row (or its error)."""
    try:
        import deep_gemm
        import torch
    except Exception as e:  # noqa: BLE001 - never a dependency
        return f"not importable ({e!r})"
    dgb = DeepGEMMGrouped(deep_gemm, torch)
    for row, wl in zip(rows, workloads):
        if row["k"] % 128 or row["n"] % 8:
            row["deepgemm"] = dict(error="skipped: DeepGEMM needs K % 128 == 0, N % 8 == 0")
            continue
        try:
            sizes_np, fns, make_set = _setup(wl, args)
            ops = make_set(0)["ours"]
            ours = jax.jit(fns["ours"])(*ops)
            ours_rows = jnp.asarray(_rows_of(ours, row["kind"], sizes_np, row["rows"]), BF16)
            del ours
            row["deepgemm"] = res = dgb.measure(row, ops[:4], ours_rows)
            B._log(f"DeepGEMM {row['name']}: {B._fmt_rate(res['tflops'])} TFLOP/s; calc_diff "
                   f"vs ours {res['diff_vs_ours']:.1e}"
                   + ("  MISMATCH (>= 1e-3)" if res["diff_vs_ours"] >= 1e-3 else ""))
        except Exception as e:  # noqa: BLE001 - report and go on
            row["deepgemm"] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            B._log(f"DeepGEMM {row['name']}: FAILED {type(e).__name__}: "
                   f"{str(e).splitlines()[0][:300] if str(e) else ''}")
    return f"deep_gemm {getattr(deep_gemm, '__version__', '?')}"


def _table(rows):
    head = ["workload", "rows", *[LABELS[i] for i in IMPLS], "DeepGEMM", "ours/ragged-bf16",
            "ours/padded", "ours/DeepGEMM", "calc_diff(ours)"]
    lines = ["  ".join(f"{h:>16}" if i else f"{h:<28}" for i, h in enumerate(head))]
    for r in rows:
        rate = _rates(r)
        cells = [f"{r['name']:<28}", f"{r['useful_rows']:>16}"]
        cells += [f"{B._fmt_rate(rate[i]):>16}" for i in (*IMPLS, "deepgemm")]
        cells += [f"{B._fmt_ratio(B._ratio(rate['ours'], rate[i])):>16}"
                  for i in ("ragged_bf16", "padded", "deepgemm")]
        cells.append(f"{B._fmt_diff(r.get('calc_diff', {}).get('ours')):>16}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _rates(row):
    rate = {i: row["impls"].get(i, {}).get("tflops") for i in IMPLS}
    rate["deepgemm"] = row.get("deepgemm", {}).get("tflops")
    return rate


def _summary(rows):
    """The MoE issue's ratios (geometric means where over several workloads)."""
    def geo(pick, against):
        return B._geomean([B._ratio(_rates(r)["ours"], _rates(r)[against])
                           for r in rows if pick(r)])
    large = lambda r: r["kind"] == "contiguous" and r["groups"] * r["rows"] >= 16384  # noqa: E731
    masked = lambda r: r["kind"] == "masked" and r["name"] in _MAIN_NAMES  # noqa: E731
    moe = lambda r: r["name"].startswith("moe-")  # noqa: E731
    summary = dict(contiguous_vs_ragged_bf16=geo(large, "ragged_bf16"),
                   contiguous_vs_deepgemm=geo(large, "deepgemm"),
                   masked_vs_deepgemm=geo(masked, "deepgemm"),
                   moe_example_vs_padded=geo(moe, "padded"),
                   deepgemm_mismatches=[r["name"] for r in rows
                                        if r.get("deepgemm", {}).get("diff_vs_ours", 0) >= 1e-3])
    lines = [
        f"ours / ragged_dot BF16, geometric mean over the large contiguous workloads: "
        f"{B._fmt_ratio(summary['contiguous_vs_ragged_bf16'])} (target 7)",
        f"ours / DeepGEMM, geometric mean over the large contiguous workloads: "
        f"{B._fmt_ratio(summary['contiguous_vs_deepgemm'])} (target 1.0)",
        f"ours / DeepGEMM, geometric mean over the masked workloads: "
        f"{B._fmt_ratio(summary['masked_vs_deepgemm'])} (target 1.0)",
        f"ours / padded on the usage guide's MoE example: "
        f"{B._fmt_ratio(summary['moe_example_vs_padded'])} (target 1.57)",
    ]
    if summary["deepgemm_mismatches"]:
        lines.append(f"DeepGEMM's output differs from ours (calc_diff >= 1e-3) on: "
                     f"{', '.join(summary['deepgemm_mismatches'])}")
    return summary, lines


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
    meta = dict(jax=jax.__version__, jax_fp8gemm=fg.__version__,
                device=getattr(dev, "device_kind", dev.platform), argv=sys.argv[1:])
    if args.json:  # the JAX figures are safe before DeepGEMM (PyTorch) starts
        B.dump_json(args.json, dict(meta=meta, rows=rows))
    if args.no_deepgemm:
        meta["deepgemm"] = "skipped (--no-deepgemm)"
    elif dev.platform != "gpu":
        meta["deepgemm"] = f"skipped (no CUDA GPU: JAX runs on {dev.platform})"
    else:
        meta["deepgemm"] = deepgemm_phase(rows, workloads, args)
    B._log(f"DeepGEMM: {meta['deepgemm']}")
    print()
    print(_table(rows))
    summary, lines = _summary(rows)
    for line in lines:
        print(line)
    if args.json:
        B.dump_json(args.json, dict(meta=meta, rows=rows, summary=summary))
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
    p.add_argument("--no-deepgemm", action="store_true", help="do not try DeepGEMM")
    # 128 calls in the long program: the MoE example's ~20 us calls then make it ~2.5 ms, so
    # that a few tens of microseconds of host-timer jitter per run are ~1% of what the slope
    # divides (~5% at 32 calls).
    B.add_timing_args(p, max_sets=8, target_calls=128, max_program_s=0.05)
    p.set_defaults(func=run_grouped)
