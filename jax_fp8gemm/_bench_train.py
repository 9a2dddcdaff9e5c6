"""`python -m jax_fp8gemm.bench train`: one MLP block's training step, FP8 against BF16.

Step: loss = mean((swiglu(x @ W1) @ W2)^2) and its gradients in x, W1 and W2 (forward and
backward), from bf16 x [T, H] and bf16 weights, where swiglu(u) = silu(gate) * up over the
two halves of u [T, 2F]. Workloads (T = 8192 tokens):

  dense-h<H>   W1 [H, 2F], W2 [F, H] with F = 4H (the issue's "ffn 4x hidden")
  moe2-h<H>    the same FFN split into 2 experts of F = 2H, tokens routed 0.7x-1.3x around
               even (sizes known to the step as a device array)

Implementations, timed in one run on the same inputs:

  fp8    jax_fp8gemm.fp8_matmul (fp8_grouped_matmul for moe2), the default Recipe: FP8
         forward and backward, 1 x 128 activation and gradient scales, 128 x 128 weight
         scales, the weight gradient 1D1D in float32 (the DeepSeek-V3 recipe)
  bf16   the same step through XLA: jnp.dot (lax.ragged_dot for moe2) on bf16 operands

Rates count 3 x the forward FLOPs (forward, data gradient, weight gradient). Timing is
bench.py's (rotated input sets, the slope of two jitted programs); the step's gradients
pass an optimization barrier, so XLA computes all of them. Accuracy: calc_diff of the FP8
step's gradients against the BF16 step's, on the same inputs.

Quantization: each quantization op on a bf16 [rows, 8192] input of --quant-mb MiB (default
256: [16384, 8192]), in GB/s of the bytes it must move (bf16 in, FP8 out, float32 scales;
per-tensor reads x twice, once for the amax and once to cast), beside a device-to-device copy of the same
input (x + 1 in bf16: one read, one write) timed the same way. The list runs twice and
each op keeps its faster time. "both layouts" is quantize_fp8_with_transpose: one read of
x, the row-quantized and the transposed copy out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_fp8gemm as fg

from . import bench as B

BF16, F32 = jnp.bfloat16, jnp.float32
TOKENS = 8192
HIDDEN = (4096, 7168)
QUICK_TOKENS, QUICK_HIDDEN = 256, (128,)
IMPLS = ("fp8", "bf16")


def _swiglu(u):
    gate, up = jnp.split(u, 2, axis=-1)
    return (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(u.dtype)


def _loss(out):
    return jnp.mean(jnp.square(out.astype(F32)))


def _dense_step(matmul):
    def loss(x, w1, w2):
        return _loss(matmul(_swiglu(matmul(x, w1)), w2))
    return loss


def _moe_step(matmul):
    def loss(x, w1, w2, sizes):
        return _loss(matmul(_swiglu(matmul(x, sizes, w1)), sizes, w2))
    return loss


LOSSES = {
    ("dense", "fp8"): _dense_step(fg.fp8_matmul),
    ("dense", "bf16"): _dense_step(jnp.dot),
    ("moe2", "fp8"): _moe_step(lambda x, sizes, w: fg.fp8_grouped_matmul(x, sizes, w)),
    ("moe2", "bf16"): _moe_step(lambda x, sizes, w: lax.ragged_dot(x, w, sizes)),
}


def _step(kind, impl):
    """(inputs...) -> one float that depends on every gradient (all computed in full)."""
    grad = jax.grad(LOSSES[kind, impl], argnums=(0, 1, 2))

    def step(*args):
        grads = lax.optimization_barrier(grad(*args))
        return sum(g[(0,) * g.ndim].astype(F32) for g in grads)
    return step


def _sizes(tokens, groups, rng):
    raw = rng.uniform(0.7, 1.3, groups)
    sizes = np.floor(raw / raw.sum() * tokens).astype(np.int32)
    sizes[np.argmax(sizes)] += tokens - sizes.sum()
    return sizes


def bench_step(kind, tokens, hidden, args, timer):
    rng = np.random.default_rng(args.seed)
    if kind == "dense":
        groups, ffn = 1, 4 * hidden
        w1_shape, w2_shape = (hidden, 2 * ffn), (ffn, hidden)
    else:
        groups, ffn = 2, 2 * hidden
        w1_shape, w2_shape = (groups, hidden, 2 * ffn), (groups, ffn, hidden)
    flops = 3 * (2.0 * tokens * hidden * 2 * ffn + 2.0 * tokens * ffn * hidden)
    sizes = jnp.asarray(_sizes(tokens, groups, rng))
    # Scaled so that every activation stays near unit size.
    make = jax.jit(lambda key: (
        jax.random.normal(jax.random.fold_in(key, 0), (tokens, hidden), BF16),
        (jax.random.normal(jax.random.fold_in(key, 1), w1_shape, F32) / hidden ** 0.5).astype(BF16),
        (jax.random.normal(jax.random.fold_in(key, 2), w2_shape, F32) / ffn ** 0.5).astype(BF16)))
    nbytes = 2 * (tokens * hidden + np.prod(w1_shape) + np.prod(w2_shape))
    key = jax.random.key(args.seed)
    sets = [make(jax.random.fold_in(key, i)) for i in range(B._num_sets(args, nbytes))]
    if kind == "moe2":
        sets = [s + (sizes,) for s in sets]
    sets = tuple(sets)
    row = dict(name=f"{kind}-h{hidden}", kind=kind, tokens=tokens, hidden=hidden, ffn=ffn,
               groups=groups, flops=flops, impls={})
    for impl in args.impls:
        try:
            res = timer.rotated(_step(kind, impl), sets)
        except Exception as e:  # noqa: BLE001 - report and go on with the other column
            B._log(f"  {impl}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            row["impls"][impl] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            continue
        res["tflops"] = flops / res["s"] / 1e12
        row["impls"][impl] = res
    if all("error" not in row["impls"].get(i, {"error": 1}) for i in IMPLS):
        # The FP8 step computes the BF16 step's gradients, up to FP8 rounding.
        grads = {i: jax.jit(jax.grad(LOSSES[kind, i], argnums=(0, 1, 2)))(*sets[0])
                 for i in IMPLS}
        row["calc_diff"] = {name: float(B.calc_diff(f, b)) for name, f, b in
                            zip(("dx", "dw1", "dw2"), grads["fp8"], grads["bf16"])}
    return row


# The six GEMMs of the dense step, each alone: (name, M, N, K, FP8 scaling of b). Forward
# and data gradients read 128 x 128 weight blocks (1D2D); weight gradients read 1 x 128
# blocks along the tokens on both operands (1D1D) and write float32.
def _step_gemms(tokens, hidden):
    ffn = 4 * hidden
    return [("fwd x@W1", tokens, 2 * ffn, hidden, "block"),
            ("fwd h@W2", tokens, hidden, ffn, "block"),
            ("dgrad dy@W2^T", tokens, ffn, hidden, "block"),
            ("dgrad du@W1^T", tokens, hidden, 2 * ffn, "block"),
            ("wgrad h^T dy", ffn, hidden, tokens, "row"),
            ("wgrad x^T du", hidden, 2 * ffn, tokens, "row")]


def bench_breakdown(tokens, hidden, args, timer):
    """Each GEMM of the dense FP8 step timed alone, beside XLA's BF16 dot of that shape."""
    out = []
    for name, m, n, k, b_scaling in _step_gemms(tokens, hidden):
        key = jax.random.fold_in(jax.random.key(args.seed), m + n + k)
        make = jax.jit(lambda key: (jax.random.normal(jax.random.fold_in(key, 0), (m, k), BF16),
                                    jax.random.normal(jax.random.fold_in(key, 1), (n, k), BF16)))
        raw = [make(jax.random.fold_in(key, i))
               for i in range(B._num_sets(args, 2 * (m * k + n * k)))]
        wq = (lambda b: fg.quantize_fp8_fine_grained(b, block_shape=(128, 128))
              if b_scaling == "block" else fg.quantize_fp8_fine_grained(b))
        fp8_sets = tuple(fg.quantize_fp8_fine_grained(a) + wq(b) for a, b in raw)
        out_dtype = F32 if b_scaling == "row" else BF16
        fp8 = timer.rotated(lambda qa, sa, qb, sb: fg.fp8_gemm_fine_grained(
            qa, qb, sa, sb, out_dtype=out_dtype, b_layout="nk", b_scaling=b_scaling), fp8_sets)
        bf16 = timer.rotated(lambda a, b: lax.dot_general(
            a, b, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype), tuple(raw))
        flops = 2.0 * m * n * k
        out.append(dict(name=name, m=m, n=n, k=k, fp8_s=fp8["s"], bf16_s=bf16["s"],
                        fp8_tflops=flops / fp8["s"] / 1e12, bf16_tflops=flops / bf16["s"] / 1e12))
        del raw, fp8_sets
    return out


# Quantization ops on x [rows, cols] bf16: (name, fn, bytes moved).
def _quant_ops(rows, cols):
    x_bytes, q_bytes = 2 * rows * cols, rows * cols
    row_scales = 4 * rows * B._cdiv(cols, 128)
    col_scales = 4 * cols * B._cdiv(rows, 128)
    block_scales = 4 * B._cdiv(rows, 128) * B._cdiv(cols, 128)
    return [
        ("copy (x + 1, bf16)", lambda x: x + jnp.asarray(1, BF16), 2 * x_bytes),
        # Two passes: the amax must be known before the first value is cast.
        ("per-tensor e4m3", lambda x: fg.quantize_fp8(x)[0], 2 * x_bytes + q_bytes + 4),
        ("1 x 128 e4m3", lambda x: fg.quantize_fp8_fine_grained(x)[0],
         x_bytes + q_bytes + row_scales),
        ("1 x 128 e5m2", lambda x: fg.quantize_fp8_fine_grained(x, 128, "e5m2")[0],
         x_bytes + q_bytes + row_scales),
        ("1 x 128 transposed", lambda x: fg.quantize_fp8_fine_grained(x, transpose=True)[0],
         x_bytes + q_bytes + col_scales),
        # One custom call writes all four outputs, whichever of them is used.
        ("1 x 128 both layouts", lambda x: fg.quantize_fp8_with_transpose(x)[0],
         x_bytes + 2 * q_bytes + row_scales + col_scales),
        ("128 x 128 e4m3", lambda x: fg.quantize_fp8_fine_grained(x, block_shape=(128, 128))[0],
         x_bytes + q_bytes + block_scales),
    ]


def bench_quantize(rows, cols, args, timer):
    key = jax.random.key(args.seed)
    make = jax.jit(lambda k: jax.random.normal(k, (rows, cols), BF16))
    sets = tuple((make(jax.random.fold_in(key, i)),)
                 for i in range(B._num_sets(args, 3 * rows * cols)))
    # Every op twice, the whole list in turn, the faster of the two kept: timed once, one
    # kernel moved by up to 2x (1 x 128 e4m3 and e5m2 run the same kernel and came out at
    # 0.64 and 1.20 of the copy in one run), the copy too.
    out = []
    for lap in range(2):
        for i, (name, fn, nbytes) in enumerate(_quant_ops(rows, cols)):
            res = timer.rotated(fn, sets)
            res.update(name=name, bytes=nbytes, gbps=nbytes / res["s"] / 1e9)
            if lap == 0:
                out.append(res)
            elif res["s"] < out[i]["s"]:
                out[i] = res
    copy = out[0]["gbps"]
    for r in out:
        r["of_copy"] = r["gbps"] / copy
    return out


def run_train(args):
    dev = jax.devices()[0]
    B._log(f"jax {jax.__version__}, device {getattr(dev, 'device_kind', dev.platform)}; "
           f"jax_fp8gemm {fg.__version__}; native FP8 kernels: {fg.has_fp8_support()}")
    tokens = QUICK_TOKENS if args.quick else args.tokens
    hiddens = QUICK_HIDDEN if args.quick else args.hidden
    timer = B.Timer(args)
    steps = []
    for kind in args.kinds:
        for h in hiddens:
            row = bench_step(kind, tokens, h, args, timer)
            steps.append(row)
            B._log(f"{row['name']}: " + "  ".join(
                f"{k} {B._fmt_us(v.get('s'))} us ({B._fmt_rate(v.get('tflops'))} TFLOP/s)"
                for k, v in row["impls"].items()))
    if steps:
        print()
        print(f"{'step':<14}{'tokens':>8}{'FP8 ms':>10}{'BF16 ms':>10}{'FP8 TFLOP/s':>13}"
              f"{'BF16 TFLOP/s':>14}{'FP8 speedup':>13}{'calc_diff dW1':>15}")
    for r in steps:
        t = {i: r["impls"].get(i, {}).get("s") for i in IMPLS}
        ms = {i: f"{t[i] * 1e3:.2f}" if t[i] else "-" for i in IMPLS}
        rate = {i: r["impls"].get(i, {}).get("tflops") for i in IMPLS}
        speed = B._ratio(t["bf16"], t["fp8"])
        print(f"{r['name']:<14}{r['tokens']:>8}{ms['fp8']:>10}{ms['bf16']:>10}"
              f"{B._fmt_rate(rate['fp8']):>13}{B._fmt_rate(rate['bf16']):>14}"
              f"{B._fmt_ratio(speed):>13}"
              f"{B._fmt_diff(r.get('calc_diff', {}).get('dw1')):>15}")
    breakdown = []
    if args.breakdown:
        h = hiddens[-1]
        breakdown = bench_breakdown(tokens, h, args, timer)
        print(f"\nthe dense-h{h} step's GEMMs alone (M x N x K)")
        print(f"{'gemm':<16}{'shape':>22}{'FP8 us':>10}{'BF16 us':>10}{'FP8 TFLOP/s':>13}"
              f"{'BF16 TFLOP/s':>14}")
        for r in breakdown:
            shape = f"{r['m']}x{r['n']}x{r['k']}"
            print(f"{r['name']:<16}{shape:>22}"
                  f"{B._fmt_us(r['fp8_s']):>10}{B._fmt_us(r['bf16_s']):>10}"
                  f"{B._fmt_rate(r['fp8_tflops']):>13}{B._fmt_rate(r['bf16_tflops']):>14}")
    quant = []
    if args.quant_mb > 0:
        cols = 128 if args.quick else 8192
        rows = 256 if args.quick else max(128, int(args.quant_mb * 2**20) // (2 * cols))
        # A quantizer takes ~0.1-0.3 ms: 8 calls left the slope to launch jitter, so the
        # long program runs at least 64 (~15 ms).
        qtimer = B.Timer(args)
        if not args.quick:
            qtimer.target_calls = max(args.target_calls, 64)
        quant = bench_quantize(rows, cols, args, qtimer)
        print(f"\nquantization of a bf16 [{rows}, {cols}] input ({2 * rows * cols / 2**20:g} MiB)")
        print(f"{'op':<22}{'time (us)':>12}{'GB/s':>10}{'of copy':>10}")
        for r in quant:
            print(f"{r['name']:<22}{B._fmt_us(r['s']):>12}{r['gbps']:>10.0f}{r['of_copy']:>10.2f}")
    if args.json:
        B.dump_json(args.json, dict(steps=steps, breakdown=breakdown, quantize=quant))
    return 0


def add_parser(sub):
    p = sub.add_parser("train", help="an MLP block's training step, FP8 (ours) vs BF16 (XLA), "
                                     "and the quantization kernels' bandwidth",
                       description=__doc__, formatter_class=B.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU")
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    p.add_argument("--kinds", nargs="*", default=["dense", "moe2"], choices=["dense", "moe2"],
                   help="steps to time (none: only the quantizers)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--breakdown", action="store_true",
                   help="also time each GEMM of the dense step alone (the largest --hidden)")
    p.add_argument("--quant-mb", type=float, default=256.0,
                   help="size of the quantization benchmark's input in MiB (0: skip it)")
    p.add_argument("--json", default="bench_train.json")
    B.add_timing_args(p, max_sets=4, target_calls=8, max_program_s=0.5)
    p.set_defaults(func=run_train)
