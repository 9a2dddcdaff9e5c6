"""MoE expert GEMM with jax_fp8gemm: grouped FP8 GEMM against a padded batched FP8 GEMM.

The JAX counterpart of the DeepGEMM usage guide's moe_example.py:

    python examples/moe_example.py --experts 8 --hidden 2048 --tokens 1024   # on a GPU
    python examples/moe_example.py          # on a CPU: scaled down, well under a minute

It simulates top-1 routing (random router logits; tokens sorted by expert with argsort;
group sizes from bincount), quantizes the tokens (1 x bs) and the per-expert [H, F]
weights (bs x bs) to FP8 once, and times the expert GEMM two ways:

  Grouped GEMM  grouped_gemm over the sorted tokens: each expert multiplies its own rows,
                group sizes stay on the device, no padding.
  Padded GEMM   every expert's tokens padded to the largest group, then one batched FP8
                GEMM (jax.vmap of fp8_gemm_fine_grained) over [G, max_group, H]: the
                padding rows are computed and thrown away, and max_group has to be known
                on the host.

Both rates count the useful FLOPs only, 2 * tokens * H * F. The two results are checked
against each other (the padded one unpadded back to the token rows) and the guide's
lines are printed:

    Grouped GEMM: ... ms (... TFLOPS)
    Padded GEMM: ... ms (... TFLOPS)
    Speedup: ...x
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_fp8gemm as fg
from _common import benchmark, fmt_ms, fmt_tflops
from jax_fp8gemm.reference import calc_diff

# Sizes used when no GPU is present and the size was not given on the command line.
CPU_SIZES = {"hidden": 256, "tokens": 256, "ffn": 128}
GPU_SIZES = {"hidden": 2048, "tokens": 1024, "ffn": 1024}
# calc_diff of an e4m3 GEMM of random normal inputs is about 6.5e-4 (DeepGEMM's tests accept
# < 1e-3); grouped vs padded should agree to bf16 rounding.
MAX_DIFF_REF = 2e-3
MAX_DIFF_PADDED = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=8, help="number of experts G (default 8)")
    p.add_argument("--hidden", type=int, default=None,
                   help=f"H, the model width (default {GPU_SIZES['hidden']}; "
                        f"{CPU_SIZES['hidden']} without a GPU)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"tokens routed (default {GPU_SIZES['tokens']}; "
                        f"{CPU_SIZES['tokens']} without a GPU)")
    p.add_argument("--ffn", type=int, default=None,
                   help=f"F, each expert's output width (default {GPU_SIZES['ffn']}; "
                        f"{CPU_SIZES['ffn']} without a GPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=10, help="timed calls (the median is printed)")
    p.add_argument("--block-size", type=int, default=128, choices=(64, 128, 256),
                   help="fine-grained block: 1 x bs for tokens, bs x bs for weights")
    p.add_argument("--w-layout", default="kn", choices=("kn", "nk"),
                   help="expert weights as [G, H, F] (default) or [G, F, H] (K-major: the "
                        "fast path)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    defaults = CPU_SIZES if on_cpu else GPU_SIZES
    args.scaled = []
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
            if on_cpu:
                args.scaled.append(f"--{name} {value}")
    if min(args.experts, args.hidden, args.tokens, args.ffn, args.iters) < 1 or args.warmup < 0:
        p.error("sizes and --iters must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    g, h, t, f, bs = args.experts, args.hidden, args.tokens, args.ffn, args.block_size
    device = jax.devices()[0]
    print(f"Device: {device} ({device.platform})")
    print(f"FP8 support: {fg.has_fp8_support(device)}")
    if args.scaled:
        print(f"No GPU: scaled down to {', '.join(args.scaled)} (pass sizes to override)")
    print(f"Experts: {g}, hidden: {h}, ffn: {f}, tokens: {t}")

    k_x, k_w, k_r = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(k_x, (t, h), jnp.bfloat16)                # tokens [T, H]
    w = jax.random.normal(k_w, (g, h, f), jnp.bfloat16) * h**-0.5   # experts [G, H, F]

    # Routing: top-1 expert per token, tokens sorted by expert (stable, so each expert's
    # rows keep their order), group sizes counted on the device.
    logits = jax.random.normal(k_r, (t, g), jnp.float32)
    expert = jnp.argmax(logits, axis=-1)
    order = jnp.argsort(expert, stable=True)
    group_sizes = jnp.bincount(expert, length=g).astype(jnp.int32)
    x_sorted = x[order]

    # Quantize once: tokens 1 x bs along H, weights bs x bs.
    w_op = w if args.w_layout == "kn" else jnp.swapaxes(w, 1, 2)
    x_fp8, sx = fg.quantize_fp8_fine_grained(x_sorted, block_size=bs)          # [T, H/bs]
    w_fp8, sw = fg.quantize_fp8_fine_grained(w_op, block_shape=(bs, bs))       # [G, ., .]

    # (a) Grouped: one call over the sorted rows; sizes are device data.
    grouped = jax.jit(lambda x, w, sx, sw, sizes: fg.grouped_gemm(
        x, w, sx, sw, sizes, out_dtype=jnp.bfloat16, block_size=bs, w_layout=args.w_layout))

    # (b) Padded: the host reads the sizes to pick max_group (a device->host sync the
    # grouped path avoids), gathers each expert's rows into [G, max_group, H] with zero
    # padding, and runs one batched GEMM.
    sizes_host = np.asarray(group_sizes)
    max_group = max(int(sizes_host.max()), 1)
    starts = jnp.cumsum(group_sizes) - group_sizes                            # [G]
    slot = jnp.arange(max_group)
    valid = slot[None, :] < group_sizes[:, None]                              # [G, max_group]
    rows = jnp.where(valid, starts[:, None] + slot[None, :], 0)
    x_pad = jnp.where(valid[..., None], x_fp8[rows], jnp.zeros((), x_fp8.dtype))
    sx_pad = jnp.where(valid[..., None], sx[rows], 0.0)
    padded = jax.jit(jax.vmap(
        lambda x, w, sx, sw: fg.fp8_gemm_fine_grained(
            x, w, sx, sw, block_size=bs, out_dtype=jnp.bfloat16, b_layout=args.w_layout),
        in_axes=(0, 0, 0, 0)))

    print(f"Group sizes: {sizes_host.tolist()} (padded GEMM: {g} x {max_group} = "
          f"{g * max_group} rows for {t} tokens)")

    # Check: the padded result, unpadded back to the sorted token rows, against the grouped
    # one; and the grouped one against the float32 product.
    y = grouped(x_fp8, w_fp8, sx, sw, group_sizes)                           # [T, F]
    y_pad = padded(x_pad, w_fp8, sx_pad, sw)                                  # [G, max_group, F]
    expert_sorted = expert[order]
    slot_of_row = jnp.arange(t) - starts[expert_sorted]
    y_unpadded = y_pad[expert_sorted, slot_of_row]                            # [T, F]
    x_pad_f32 = jnp.where(valid[..., None], x_sorted[rows].astype(jnp.float32), 0.0)
    ref = jnp.einsum("gmh,ghf->gmf", x_pad_f32, w.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)[expert_sorted, slot_of_row]
    diff_pad = calc_diff(y, y_unpadded)
    diff_ref = calc_diff(y, ref)
    close = bool(jnp.allclose(y.astype(jnp.float32), y_unpadded.astype(jnp.float32),
                              rtol=1e-2, atol=1e-2))
    print(f"Check: grouped vs padded calc_diff = {diff_pad:.2e} "
          f"({'match' if close else 'MISMATCH'} within bf16 tolerance); "
          f"grouped vs FP32 calc_diff = {diff_ref:.2e}")

    grouped_s = benchmark(grouped, x_fp8, w_fp8, sx, sw, group_sizes,
                          warmup=args.warmup, iters=args.iters)
    padded_s = benchmark(padded, x_pad, w_fp8, sx_pad, sw, warmup=args.warmup, iters=args.iters)
    flops = 2.0 * t * h * f  # useful work only, for both
    print(f"Grouped GEMM: {fmt_ms(grouped_s)} ms ({fmt_tflops(flops, grouped_s)} TFLOPS)")
    print(f"Padded GEMM: {fmt_ms(padded_s)} ms ({fmt_tflops(flops, padded_s)} TFLOPS)")
    print(f"Speedup: {padded_s / grouped_s:.2f}x")

    if not (close and diff_pad <= MAX_DIFF_PADDED and diff_ref <= MAX_DIFF_REF):
        print("FAILED: the grouped result does not match", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
