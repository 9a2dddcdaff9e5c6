"""Grouped FP8 GEMMs for Mixture-of-Experts, and the fused expert MLP.

Weights are [G, K, N] (w_layout="kn", matmul semantics) or [G, N, K] (w_layout="nk",
K-major: the fast path, no transpose). Scaling is chosen by the weight scales' rank:
  per-tensor:   scale_w [G] (or a scalar), scale_x a scalar or [G] (one per group)
  fine-grained: scale_w [G, ceil(K/bs), ceil(N/bs)] ("kn") / [G, ceil(N/bs), ceil(K/bs)]
                ("nk"), scale_x 1 x bs blocks along K (as from quantize_fp8_fine_grained).
Group sizes live on the device: no host synchronization, so these run under jit and
inside CUDA graphs. Sizes need no padding; negative sizes count as 0 and rows beyond the
array are dropped (rows not in any group come back as zeros).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _dtypes
from .primitives.grouped import grouped_contiguous, grouped_masked
from .quantization import quantize_fp8_fine_grained

__all__ = ["grouped_gemm", "grouped_gemm_masked", "grouped_gemm_moe", "permute_tokens",
           "unpermute_tokens"]

W_LAYOUTS = ("kn", "nk")


def _cdiv(a, b):
    return -(-a // b)


def _weights(w, scale_w, w_layout, k, block_size):
    """Validated (w_nk [G, N, K], scale_w in the kernel layout, scale_mode, N)."""
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"w_layout must be 'kn' ([G, K, N]) or 'nk' ([G, N, K]), got {w_layout!r}")
    w = _dtypes.fp8_array(w, "w")
    if w.ndim != 3:
        raise ValueError(f"w must have rank 3 ([G, K, N] or [G, N, K]), got shape {w.shape}")
    g = w.shape[0]
    wk, n = (w.shape[1], w.shape[2]) if w_layout == "kn" else (w.shape[2], w.shape[1])
    if wk != k:
        want = f"({g}, {k}, N)" if w_layout == "kn" else f"({g}, N, {k})"
        raise ValueError(f"w has shape {w.shape}, expected {want}: K must match x's last axis")
    w_nk = jnp.swapaxes(w, 1, 2) if w_layout == "kn" else w
    sw = _dtypes.f32_array(scale_w, "scale_w")
    if sw.ndim == 3:
        bs = _dtypes.block_size(block_size)
        want = ((g, _cdiv(k, bs), _cdiv(n, bs)) if w_layout == "kn" else (g, _cdiv(n, bs), _cdiv(k, bs)))
        if sw.shape != want:
            raise ValueError(
                f"scale_w has shape {sw.shape}, expected {want} ({bs} x {bs} blocks of w, "
                f"w_layout={w_layout!r})")
        return w_nk, (jnp.swapaxes(sw, 1, 2) if w_layout == "kn" else sw), "block", n
    if sw.size not in (1, g) or sw.ndim > 1:
        raise ValueError(
            f"scale_w has shape {sw.shape}: expected ({g},) or a scalar for per-tensor scaling, "
            f"or a rank-3 array of block scales")
    return w_nk, jnp.broadcast_to(sw.reshape(-1), (g,)), "tensor", n


def _x_scales(scale_x, mode, rows_shape, k, groups, block_size):
    sx = _dtypes.f32_array(scale_x, "scale_x")
    if mode == "block":
        want = rows_shape + (_cdiv(k, block_size),)
        if sx.shape != want:
            raise ValueError(
                f"scale_x has shape {sx.shape}, expected {want} (1 x {block_size} blocks of x "
                f"along K, since scale_w holds block scales)")
        return sx
    if sx.ndim > 1 or sx.size not in (1, groups):
        raise ValueError(
            f"scale_x has shape {sx.shape}, expected a scalar or ({groups},) for per-tensor "
            f"scaling (scale_w is per-tensor)")
    return jnp.broadcast_to(sx.reshape(-1), (groups,))


def grouped_gemm(x, w, scale_x, scale_w, group_sizes=None, *, out_dtype=jnp.bfloat16,
                 block_size=128, w_layout="kn"):
    """The MoE grouped GEMM: out[rows of group g] = x[rows of g] @ w[g].

    Array form (use under jit): x [M_total, K] FP8 with the rows of group g contiguous,
    group_sizes [G] int on the device (any values; rows past their sum come back as 0),
    w [G, K, N] (or [G, N, K] with w_layout="nk") -> [M_total, N].

    List form (the usage guide's): x, w, scale_x, scale_w are lists with one entry per
    expert (x_i [m_i, K], w_i [K, N] or [N, K]); returns the list of outputs. It runs as one
    grouped call over the concatenated rows.
    """
    out = _dtypes.out_dtype(out_dtype)
    if isinstance(x, (list, tuple)):
        return _grouped_gemm_list(x, w, scale_x, scale_w, group_sizes, out, block_size, w_layout)
    if group_sizes is None:
        raise ValueError("group_sizes is required when x is an array (the rows of each group)")
    x = _dtypes.fp8_array(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must have shape [M_total, K], got {x.shape}")
    m, k = x.shape
    w_nk, sw, mode, n = _weights(w, scale_w, w_layout, k, block_size)
    g = w_nk.shape[0]
    sizes = _dtypes.group_sizes(group_sizes, "group_sizes", g)
    sx = _x_scales(scale_x, mode, (m,), k, g, block_size)
    y = grouped_contiguous(x[None], sizes[None], w_nk[None], sx[None], sw[None],
                           scale_mode=mode, block_size=block_size, out_dtype=out)
    return y[0]


def _grouped_gemm_list(xs, ws, sxs, sws, group_sizes, out, block_size, w_layout):
    if group_sizes is not None:
        raise ValueError("group_sizes is implied by the list form; pass x as an array to give it")
    if not (len(xs) == len(ws) == len(sxs) == len(sws)) or not xs:
        raise ValueError(
            f"the list form needs one x, w, scale_x and scale_w per expert, got "
            f"{len(xs)}, {len(ws)}, {len(sxs)} and {len(sws)}")
    xs = [_dtypes.fp8_array(x, f"x[{i}]") for i, x in enumerate(xs)]
    for i, x in enumerate(xs):
        if x.ndim != 2 or x.shape[1] != xs[0].shape[1]:
            raise ValueError(f"x[{i}] has shape {x.shape}, expected (m_{i}, {xs[0].shape[1]})")
    sizes = [x.shape[0] for x in xs]
    sws = [_dtypes.f32_array(s, f"scale_w[{i}]") for i, s in enumerate(sws)]
    block = sws[0].ndim == 2
    w = jnp.stack([_dtypes.fp8_array(w, f"w[{i}]") for i, w in enumerate(ws)])
    sw = jnp.stack([s if block else s.reshape(()) for s in sws])
    sxs = [_dtypes.f32_array(s, f"scale_x[{i}]") for i, s in enumerate(sxs)]
    sx = (jnp.concatenate(sxs) if block else jnp.stack([s.reshape(()) for s in sxs]))
    y = grouped_gemm(jnp.concatenate(xs), w, sx, sw, jnp.asarray(sizes, jnp.int32),
                     out_dtype=out, block_size=block_size, w_layout=w_layout)
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [y[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]


def grouped_gemm_masked(x, masked_m, w, scale_x, scale_w, *, out_dtype=jnp.bfloat16,
                        block_size=128, w_layout="kn"):
    """Masked grouped GEMM for decoding: x [G, M_max, K], masked_m [G] int on the device.

    out[g, :masked_m[g]] = x[g, :masked_m[g]] @ w[g]; rows at and past masked_m[g] are not
    computed and come back as zeros. Per-tensor scale_x is a scalar or [G]; block scale_x is
    [G, M_max, ceil(K/bs)]. Returns [G, M_max, N].
    """
    out = _dtypes.out_dtype(out_dtype)
    x = _dtypes.fp8_array(x, "x")
    if x.ndim != 3:
        raise ValueError(f"x must have shape [G, M_max, K], got {x.shape}")
    g, m, k = x.shape
    w_nk, sw, mode, n = _weights(w, scale_w, w_layout, k, block_size)
    if w_nk.shape[0] != g:
        raise ValueError(f"w has {w_nk.shape[0]} groups, but x has {g}")
    sizes = _dtypes.group_sizes(masked_m, "masked_m", g)
    sx = _x_scales(scale_x, mode, (g, m), k, g, block_size)
    y = grouped_masked(x[None], sizes[None], w_nk[None], sx[None], sw[None],
                       scale_mode=mode, block_size=block_size, out_dtype=out)
    return y[0]


ACTIVATIONS = {
    "swiglu": lambda h: jax.nn.silu(h[..., : h.shape[-1] // 2]) * h[..., h.shape[-1] // 2:],
    "geglu": lambda h: jax.nn.gelu(h[..., : h.shape[-1] // 2]) * h[..., h.shape[-1] // 2:],
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
}


def grouped_gemm_moe(x, group_sizes, w1, w2, use_fp8=True, activation="swiglu", *,
                     block_size=128, out_dtype=None, dtype="e4m3"):
    """The usage guide's fused expert MLP: per expert g, out = act(x_g @ w1[g]) @ w2[g].

    x [M_total, H] (float; rows of expert g contiguous), group_sizes [G] on the device,
    w1 [G, H, F1] and w2 [G, F, H] (float). For "swiglu"/"geglu", w1 holds the gate and up
    projections side by side (F1 = 2F: gate first). use_fp8=True quantizes x and the hidden
    activations 1 x bs and the weights bs x bs and runs both GEMMs in FP8;
    use_fp8=False runs the same in BF16 (jax.lax.ragged_dot). Rows past the sum of
    group_sizes come back as zeros. Returns [M_total, H] in out_dtype (default x.dtype).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    x = _dtypes.float_array(x, "x")
    w1, w2 = _dtypes.float_array(w1, "w1"), _dtypes.float_array(w2, "w2")
    if x.ndim != 2 or w1.ndim != 3 or w2.ndim != 3:
        raise ValueError(
            f"expected x [M, H], w1 [G, H, F1], w2 [G, F, H]; got {x.shape}, {w1.shape}, {w2.shape}")
    (m, h), (g, h1, f1), (g2, f, h2) = x.shape, w1.shape, w2.shape
    gated = activation in ("swiglu", "geglu")
    if h1 != h or h2 != h or g2 != g or (f1 != 2 * f if gated else f1 != f):
        raise ValueError(
            f"inconsistent shapes x {x.shape}, w1 {w1.shape}, w2 {w2.shape}: expected "
            f"w1 [G, {h}, {'2F' if gated else 'F'}] and w2 [G, F, {h}]")
    out_dtype = x.dtype if out_dtype is None else _dtypes.out_dtype(out_dtype)
    sizes = _dtypes.group_sizes(group_sizes, "group_sizes", g)
    act = ACTIVATIONS[activation]
    if not use_fp8:
        bf = jnp.bfloat16
        hid = jax.lax.ragged_dot(x.astype(bf), w1.astype(bf), sizes, preferred_element_type=jnp.float32)
        hid = act(hid).astype(bf)
        y = jax.lax.ragged_dot(hid, w2.astype(bf), sizes, preferred_element_type=jnp.float32)
        return _zero_tail(y, sizes).astype(out_dtype)
    bs = _dtypes.block_size(block_size)
    qx, sx = quantize_fp8_fine_grained(x, bs, dtype)
    qw1, sw1 = quantize_fp8_fine_grained(w1, bs, dtype, block_shape=(bs, bs))
    qw2, sw2 = quantize_fp8_fine_grained(w2, bs, dtype, block_shape=(bs, bs))
    hid = grouped_gemm(qx, qw1, sx, sw1, sizes, out_dtype=jnp.bfloat16, block_size=bs)
    qh, sh = quantize_fp8_fine_grained(act(hid.astype(jnp.float32)), bs, dtype)
    return grouped_gemm(qh, qw2, sh, sw2, sizes, out_dtype=out_dtype if out_dtype in
                        _dtypes.OUT_DTYPES else jnp.float32, block_size=bs).astype(out_dtype)


def _zero_tail(y, sizes):
    """Zeros the rows past the sum of the (clamped) group sizes."""
    total = jnp.minimum(jnp.sum(jnp.maximum(sizes, 0)), y.shape[0])
    return jnp.where(jnp.arange(y.shape[0])[:, None] < total, y, 0)


# ---------------------------------------------------------------------------------------
# Token permutation: from routed tokens to the contiguous layout of grouped_gemm and back.

def permute_tokens(x, expert_ids, num_experts):
    """Sorts token rows by expert, for a contiguous grouped GEMM.

    x [T, H]; expert_ids [T] or [T, k] int (each token's experts, e.g. the indices of
    lax.top_k over router probabilities). Returns (x_sorted [T*k, H], group_sizes [E] int32,
    order [T*k] int32): row i of x_sorted is token order[i] // k, the rows of expert e are
    contiguous and in token order, and group_sizes counts them. Ids outside
    [0, num_experts) are dropped: their rows sort last, outside every group (grouped_gemm
    returns zeros there, so unpermute_tokens adds nothing for them). Runs on the device
    under jit; differentiable in x.
    """
    x = jnp.asarray(x)
    ids = jnp.asarray(expert_ids)
    if x.ndim != 2 or ids.ndim not in (1, 2) or ids.shape[0] != x.shape[0]:
        raise ValueError(f"permute_tokens takes x [T, H] and expert_ids [T] or [T, k]; got x "
                         f"{x.shape}, expert_ids {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"expert_ids must be integers, got {ids.dtype}")
    k = 1 if ids.ndim == 1 else ids.shape[1]
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    order = jnp.argsort(jnp.where(valid, flat, num_experts), stable=True).astype(jnp.int32)
    sizes = jnp.bincount(jnp.where(valid, flat, num_experts), length=num_experts + 1)
    return x[order // k], sizes[:num_experts].astype(jnp.int32), order


def unpermute_tokens(y_sorted, order, weights=None, num_tokens=None):
    """Inverse of permute_tokens: y[t] = sum over token t's k rows of weights[t, j] * row.

    y_sorted [T*k, N] (a grouped GEMM's output on permute_tokens' rows); order from
    permute_tokens; weights [T] or [T, k] (e.g. the renormalized routing probabilities;
    None: 1). Sums in float32 and returns y_sorted's dtype, [num_tokens, N] (num_tokens
    defaults to T*k / k with k from weights, else T*k). Rows of dropped ids (past the
    groups) must be zeros, as every grouped GEMM here returns them. Differentiable in
    y_sorted and weights.
    """
    y_sorted = jnp.asarray(y_sorted)
    order = jnp.asarray(order)
    if y_sorted.ndim != 2 or order.shape != (y_sorted.shape[0],):
        raise ValueError(f"unpermute_tokens takes y_sorted [T*k, N] and order [T*k]; got "
                         f"{y_sorted.shape} and {order.shape}")
    k = 1 if weights is None or jnp.ndim(weights) == 1 else jnp.shape(weights)[1]
    if num_tokens is None:
        num_tokens = y_sorted.shape[0] // k
    if num_tokens * k != y_sorted.shape[0]:
        raise ValueError(f"y_sorted has {y_sorted.shape[0]} rows, expected num_tokens * k = "
                         f"{num_tokens} * {k}")
    rows = y_sorted.astype(jnp.float32)
    if weights is not None:
        rows = rows * jnp.asarray(weights, jnp.float32).reshape(-1)[order][:, None]
    y = jax.ops.segment_sum(rows, order // k, num_segments=num_tokens)
    return y.astype(y_sorted.dtype)
