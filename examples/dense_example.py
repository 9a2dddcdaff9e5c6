"""Dense FP8 GEMM with jax_fp8gemm: quantize, multiply, check accuracy, compare with BF16.

The JAX counterpart of the DeepGEMM usage guide's dense_example.py:

    python examples/dense_example.py                 # 512^3: a few seconds on a CPU
    python examples/dense_example.py --size 4096 --warmup 10 --iters 100   # on a GPU

prints the device, whether the FP8 kernels are native there, the accuracy of the FP8
result against the float32 product, and the guide's benchmark lines:

    Size: 4096x4096x4096
    FP8 GEMM: ... ms (... TFLOPS)
    BF16 GEMM: ... ms (... TFLOPS)
    Speedup: ...x

Inputs are quantized once, outside the timed region (as in the guide); the FP8 time is
the GEMM on the pre-quantized operands, the BF16 time is jnp.dot of the BF16 operands.
Both run under jax.jit; times are medians over --iters calls, each waited for with
block_until_ready, after --warmup untimed calls.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import jax_fp8gemm as fg
from _common import benchmark, fmt_ms, fmt_tflops
from jax_fp8gemm.reference import calc_diff

# calc_diff of an e4m3 GEMM of random normal inputs is about 6.5e-4 (per-tensor or
# fine-grained); DeepGEMM's own tests accept < 1e-3. Fail loudly well past that.
MAX_DIFF = 2e-3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512,
                   help="M = N = K (default 512, seconds on a CPU; use 4096 on a GPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=10, help="timed calls (the median is printed)")
    p.add_argument("--block-size", type=int, default=128, choices=(64, 128, 256),
                   help="fine-grained block: 1 x bs for A, bs x bs for B")
    p.add_argument("--per-tensor", action="store_true",
                   help="one scale per tensor (quantize_fp8 + fp8_gemm) instead of blocks")
    p.add_argument("--b-layout", default="kn", choices=("kn", "nk"),
                   help="B as [K, N] (the guide's, default) or [N, K] (K-major: the fast path)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.size < 1:
        p.error("--size and --iters must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    m = n = k = args.size
    bs = args.block_size
    device = jax.devices()[0]
    print(f"Device: {device} ({device.platform})")
    native = fg.has_fp8_support(device)
    print(f"FP8 support: {native}")

    key_a, key_b = jax.random.split(jax.random.key(args.seed))
    a = jax.random.normal(key_a, (m, k), jnp.bfloat16)  # [M, K]
    b = jax.random.normal(key_b, (k, n), jnp.bfloat16)  # [K, N]
    b_op = b if args.b_layout == "kn" else b.T          # B as passed to the GEMM

    # Quantize once (weights are static; activations would be quantized per step).
    if args.per_tensor:
        a_fp8, scale_a = fg.quantize_fp8(a, dtype="e4m3")
        b_fp8, scale_b = fg.quantize_fp8(b_op, dtype="e4m3")
        fp8_fn = jax.jit(lambda a, b, sa, sb: fg.fp8_gemm(
            a, b, sa, sb, out_dtype=jnp.bfloat16, b_layout=args.b_layout))
        recipe = "per-tensor"
    else:
        a_fp8, scale_a = fg.quantize_fp8_fine_grained(a, block_size=bs, dtype="e4m3")
        b_fp8, scale_b = fg.quantize_fp8_fine_grained(b_op, dtype="e4m3", block_shape=(bs, bs))
        fp8_fn = jax.jit(lambda a, b, sa, sb: fg.fp8_gemm_fine_grained(
            a, b, sa, sb, block_size=bs, out_dtype=jnp.bfloat16, b_layout=args.b_layout))
        recipe = f"fine-grained, A 1x{bs}, B {bs}x{bs}"
    bf16_fn = jax.jit(jnp.dot)

    # Accuracy: the FP8 result against the float32 product of the BF16 inputs.
    c = fp8_fn(a_fp8, b_fp8, scale_a, scale_b)
    ref = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
    diff = calc_diff(c, ref)
    print(f"Accuracy ({recipe}, B {args.b_layout}): calc_diff vs FP32 = {diff:.2e}")

    fp8_s = benchmark(fp8_fn, a_fp8, b_fp8, scale_a, scale_b,
                      warmup=args.warmup, iters=args.iters)
    bf16_s = benchmark(bf16_fn, a, b, warmup=args.warmup, iters=args.iters)
    flops = 2.0 * m * n * k
    if not native:
        print("Note: no native FP8 kernels on this device (portable backend): the times "
              "below show correctness, not FP8 speed.")
    print(f"Size: {m}x{n}x{k}")
    print(f"FP8 GEMM: {fmt_ms(fp8_s)} ms ({fmt_tflops(flops, fp8_s)} TFLOPS)")
    print(f"BF16 GEMM: {fmt_ms(bf16_s)} ms ({fmt_tflops(flops, bf16_s)} TFLOPS)")
    print(f"Speedup: {bf16_s / fp8_s:.2f}x")

    if not diff <= MAX_DIFF:  # also catches NaN
        print(f"FAILED: calc_diff {diff:.2e} exceeds {MAX_DIFF:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
