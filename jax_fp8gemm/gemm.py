"""Dense FP8 GEMMs: per-tensor and fine-grained scaling.

Layouts. `a` is [..., M, K] (leading axes fold into M). `b` is [K, N] by default
(b_layout="kn", ordinary matmul semantics, like the usage guide) or [N, K] with
b_layout="nk". The FP8 tensor cores read both operands K-major, so "nk" is the fast path:
a [K, N] operand is transposed (one extra pass over b) before the kernel. Scales always
describe b as passed.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from . import _dtypes
from .primitives.gemm import gemm

__all__ = ["fp8_gemm", "fp8_gemm_fine_grained"]

B_LAYOUTS = ("kn", "nk")


def _cdiv(a, b):
    return -(-a // b)


def _operands(a, b, b_layout):
    """Validated (a2d [M, K], b_nk [N, K], leading shape of a, M, N, K)."""
    if b_layout not in B_LAYOUTS:
        raise ValueError(f"b_layout must be 'kn' ([K, N]) or 'nk' ([N, K]), got {b_layout!r}")
    a = _dtypes.fp8_array(a, "a")
    b = _dtypes.fp8_array(b, "b")
    if a.ndim < 1:
        raise ValueError(f"a must have shape [..., M, K], got {a.shape}")
    if b.ndim != 2:
        raise ValueError(f"b must have rank 2 ([K, N] or [N, K]), got shape {b.shape}")
    k = a.shape[-1]
    kb, n = b.shape if b_layout == "kn" else b.shape[::-1]
    if kb != k:
        want = "(K, N)" if b_layout == "kn" else "(N, K)"
        raise ValueError(
            f"b has shape {b.shape}, expected {want} with K = {k} (a's last axis) for "
            f"b_layout={b_layout!r}")
    lead = a.shape[:-2] + (a.shape[-2],) if a.ndim >= 2 else ()
    m = math.prod(lead)
    return a.reshape(m, k), (b.T if b_layout == "kn" else b), lead, m, n, k


def fp8_gemm(a, b, scale_a, scale_b, out_dtype=jnp.bfloat16, *, b_layout="kn"):
    """C = (a * scale_a) @ (b * scale_b) with per-tensor float32 scales.

    a [..., M, K] and b ([K, N], or [N, K] with b_layout="nk") are FP8; scale_a and
    scale_b are scalars (as returned by quantize_fp8). Returns [..., M, N] in out_dtype
    (bfloat16 or float32).

    >>> c = fp8_gemm(a_fp8, b_fp8, scale_a, scale_b, out_dtype=jnp.bfloat16)
    """
    out = _dtypes.out_dtype(out_dtype)
    a2, b_nk, lead, m, n, k = _operands(a, b, b_layout)
    scales = []
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        s = _dtypes.f32_array(s, name)
        if s.size != 1:
            raise ValueError(
                f"{name} must be a per-tensor scalar, got shape {s.shape} (use "
                f"fp8_gemm_fine_grained for block scales)")
        scales.append(s.reshape(1))
    c = gemm(a2, b_nk, *scales, scale_mode="tensor", block_size=128, out_dtype=out)
    return c.reshape(lead + (n,))


def fp8_gemm_fine_grained(a, b, scales_a, scales_b, block_size=128, out_dtype=jnp.bfloat16,
                          *, b_layout="kn", b_scaling="block", accumulator=None):
    """C = a @ b with fine-grained scales (the DeepSeek-V3 recipe).

    scales_a: [..., M, ceil(K/bs)], 1 x bs blocks along K (quantize_fp8_fine_grained(a)).
    scales_b, b_scaling="block" (1D2D, the forward pass): bs x bs blocks of b as passed:
      [ceil(K/bs), ceil(N/bs)] for b_layout="kn", [ceil(N/bs), ceil(K/bs)] for "nk".
    scales_b, b_scaling="row" (1D1D, the weight gradient): 1 x bs blocks along K per row
      of b: [ceil(K/bs), N] for "kn", [N, ceil(K/bs)] for "nk".
    accumulator: optional float32 [..., M, N]; returns accumulator + a @ b (out_dtype must
      be float32). Under jit, donate it to update it in place.

    Products are summed in float32 within each K block and promoted with the block's scales
    into a float32 accumulator. Returns [..., M, N] in out_dtype.
    """
    bs = _dtypes.block_size(block_size)
    out = _dtypes.out_dtype(out_dtype)
    if b_scaling not in ("block", "row"):
        raise ValueError(f"b_scaling must be 'block' (bs x bs) or 'row' (1 x bs), got {b_scaling!r}")
    a2, b_nk, lead, m, n, k = _operands(a, b, b_layout)
    sa = _dtypes.f32_array(scales_a, "scales_a")
    want_sa = lead + (_cdiv(k, bs),)
    if sa.shape != want_sa:
        raise ValueError(
            f"scales_a has shape {sa.shape}, expected {want_sa} (1 x {bs} blocks of a along K)")
    sb = _dtypes.f32_array(scales_b, "scales_b")
    nb = _cdiv(n, bs) if b_scaling == "block" else n
    want_sb = (_cdiv(k, bs), nb) if b_layout == "kn" else (nb, _cdiv(k, bs))
    if sb.shape != want_sb:
        what = f"{bs} x {bs} blocks" if b_scaling == "block" else f"1 x {bs} blocks along K"
        raise ValueError(
            f"scales_b has shape {sb.shape}, expected {want_sb} ({what} of b with "
            f"b_layout={b_layout!r})")
    if b_layout == "kn":
        sb = sb.T
    acc = None
    if accumulator is not None:
        acc = _dtypes.f32_array(accumulator, "accumulator")
        if acc.shape != lead + (n,):
            raise ValueError(f"accumulator has shape {acc.shape}, expected {lead + (n,)}")
        if out != jnp.float32:
            raise ValueError("accumulator needs out_dtype=jnp.float32")
        acc = acc.reshape(m, n)
    c = gemm(a2, b_nk, sa.reshape(m, sa.shape[-1]), sb, acc, scale_mode=b_scaling, block_size=bs,
             out_dtype=out)
    return c.reshape(lead + (n,))
