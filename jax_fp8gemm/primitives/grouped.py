"""Grouped GEMM primitives for Mixture-of-Experts.

All three carry a leading batch axis B (1 for a plain call; vmap folds into it), and the
weights a batch axis Bw that is 1 (shared by every batch entry) or B.

grouped_contiguous_p(x [B, M, K], group_sizes [B, G] i32, w [Bw, G, N, K], scale_x, scale_w)
    -> [B, M, N]. Group g owns the rows after group g-1's; rows past the last group are 0.
grouped_masked_p(x [B, G, M, K], masked_m [B, G] i32, w [Bw, G, N, K], scale_x, scale_w)
    -> [B, G, M, N]. Group g owns rows [0, masked_m[g]) of its M rows; the rest are 0.
  scale_mode "tensor": scale_x [B, G], scale_w [Bw, G]
  scale_mode "block":  scale_x [B, (G,) M, ceil(K/bs)], scale_w [Bw, G, ceil(N/bs), ceil(K/bs)]
grouped_kgrouped_p(a [B, N, T], b [B, K, T], group_sizes [B, G] i32, scale_a [B, N, tb],
                   scale_b [B, K, tb][, accumulator]) -> [B, G, N, K] float32
    out[b, g] = a_g @ b_g^T over group g's tokens (the MoE weight gradient), both operands
    scaled 1 x bs along the token axis T.

Group sizes are read on the device. Negative sizes count as 0 and groups running past the
last row are cut there (csrc/common/problem.h group_rows), so no size vector can make a
kernel touch memory outside its arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.interpreters import batching

from .. import _ffi
from . import _common as c


def _check_weights(x_batch, w, groups_from):
    c.check_fp8("w", w)
    c.check_rank("w", w, 4, "[batch, groups, N, K]")
    if w.shape[0] not in (1, x_batch):
        raise ValueError(f"w has batch {w.shape[0]}, expected 1 or {x_batch}")
    if groups_from != w.shape[1]:
        raise ValueError(
            f"w has {w.shape[1]} groups, but the group sizes have {groups_from}")


def _grouped_abstract_eval(masked, x, sizes, w, scale_x, scale_w, *, scale_mode, block_size,
                           out_dtype):
    sizes_name = "masked_m" if masked else "group_sizes"
    c.check_fp8("x", x)
    c.check_rank("x", x, 4 if masked else 3, "[batch, groups, M, K]" if masked else "[batch, M, K]")
    c.check_int32(sizes_name, sizes)
    c.check_rank(sizes_name, sizes, 2, "[batch, groups]")
    bsz, k = x.shape[0], x.shape[-1]
    m = x.shape[-2]
    groups = sizes.shape[1]
    c.check_shape(sizes_name, sizes, (bsz, groups))
    _check_weights(bsz, w, groups)
    if masked:
        c.check_shape("x", x, (bsz, groups, m, k))
    n = w.shape[2]
    c.check_shape("w", w, (w.shape[0], groups, n, k), f"[batch, groups, N, K] with x's K = {k}")
    c.check_f32("scale_x", scale_x)
    c.check_f32("scale_w", scale_w)
    kb = c.cdiv(k, block_size)
    if scale_mode == "tensor":
        c.check_shape("scale_x", scale_x, (bsz, groups), "one scale per group")
        c.check_shape("scale_w", scale_w, (w.shape[0], groups), "one scale per group")
    elif scale_mode == "block":
        rows = (bsz, groups, m) if masked else (bsz, m)
        c.check_shape("scale_x", scale_x, rows + (kb,), f"1 x {block_size} blocks along K")
        c.check_shape("scale_w", scale_w, (w.shape[0], groups, c.cdiv(n, block_size), kb),
                      f"{block_size} x {block_size} blocks")
    else:
        raise ValueError(f"grouped GEMMs take 'tensor' or 'block' scales, got {scale_mode!r}")
    c.check_out(out_dtype)
    return c.shaped(x.shape[:-1] + (n,), out_dtype)


def _grouped_batch(prim, args, dims, **params):
    size = c.mapped_size(args, dims)
    x, sizes, w, sx, sw = args
    dx, dsizes, dw, dsx, dsw = dims
    batch = c.unmapped_shape(x, dx)[0]
    x, sizes, sx = (c.fold_into_batch(v, d, size) for v, d in ((x, dx), (sizes, dsizes), (sx, dsx)))
    w, sw = c.fold_weights([w, sw], [dw, dsw], size, batch)
    out = prim.bind(x, sizes, w, sx, sw, **params)
    return c.split_leading(out, size), 0


def _grouped_attrs(scale_mode, block_size, out_dtype):
    return dict(scale_mode=c.SCALE_MODES[scale_mode], block_size=int(block_size))


grouped_contiguous_p = c.make_primitive("grouped_contiguous")
grouped_contiguous_p.def_abstract_eval(
    lambda *a, **p: _grouped_abstract_eval(False, *a, **p))
batching.primitive_batchers[grouped_contiguous_p] = (
    lambda args, dims, **p: _grouped_batch(grouped_contiguous_p, args, dims, **p))
_ffi.register_lowering(grouped_contiguous_p, "grouped_contiguous", _grouped_attrs)

grouped_masked_p = c.make_primitive("grouped_masked")
grouped_masked_p.def_abstract_eval(lambda *a, **p: _grouped_abstract_eval(True, *a, **p))
batching.primitive_batchers[grouped_masked_p] = (
    lambda args, dims, **p: _grouped_batch(grouped_masked_p, args, dims, **p))
_ffi.register_lowering(grouped_masked_p, "grouped_masked", _grouped_attrs)


# ---------------------------------------------------------------------------------------
grouped_kgrouped_p = c.make_primitive("grouped_kgrouped")


def _kgrouped_abstract_eval(a, b, sizes, scale_a, scale_b, *acc, block_size):
    c.check_fp8("a", a)
    c.check_fp8("b", b)
    c.check_rank("a", a, 3, "[batch, N, tokens]")
    c.check_rank("b", b, 3, "[batch, K, tokens]")
    bsz, n, t = a.shape
    k = b.shape[1]
    c.check_shape("b", b, (bsz, k, t), f"[batch, K, tokens] with a's tokens = {t}")
    c.check_int32("group_sizes", sizes)
    c.check_rank("group_sizes", sizes, 2, "[batch, groups]")
    groups = sizes.shape[1]
    c.check_shape("group_sizes", sizes, (bsz, groups))
    tb = c.cdiv(t, block_size)
    c.check_f32("scale_a", scale_a)
    c.check_f32("scale_b", scale_b)
    c.check_shape("scale_a", scale_a, (bsz, n, tb), f"1 x {block_size} blocks along tokens")
    c.check_shape("scale_b", scale_b, (bsz, k, tb), f"1 x {block_size} blocks along tokens")
    if acc:
        c.check_f32("accumulator", acc[0])
        c.check_shape("accumulator", acc[0], (bsz, groups, n, k))
    return c.shaped((bsz, groups, n, k), jnp.float32)


def _kgrouped_batch(args, dims, *, block_size):
    size = c.mapped_size(args, dims)
    args = [c.fold_into_batch(x, d, size) for x, d in zip(args, dims)]
    out = grouped_kgrouped_p.bind(*args, block_size=block_size)
    return c.split_leading(out, size), 0


grouped_kgrouped_p.def_abstract_eval(_kgrouped_abstract_eval)
batching.primitive_batchers[grouped_kgrouped_p] = _kgrouped_batch
_ffi.register_lowering(grouped_kgrouped_p, "grouped_kgrouped",
                       lambda block_size: dict(block_size=int(block_size)),
                       aliases=lambda n: {5: 0} if n == 6 else None)


def _bind_grouped(prim, x, sizes, w, scale_x, scale_w, *, scale_mode, block_size, out_dtype):
    return c.bind_with_k_padded(prim, (x, sizes, w, scale_x, scale_w), (0, 2),
                                scale_mode=scale_mode, block_size=int(block_size),
                                out_dtype=jnp.dtype(out_dtype))


def grouped_contiguous(*args, **params):
    return _bind_grouped(grouped_contiguous_p, *args, **params)


def grouped_masked(*args, **params):
    return _bind_grouped(grouped_masked_p, *args, **params)


def grouped_kgrouped(a, b, sizes, scale_a, scale_b, accumulator=None, *, block_size):
    # The tokens are the reduction axis (K of the Hopper kernel): padded to a multiple of 16
    # like K elsewhere. Padded tokens lie past every group's end or inside a group cut at
    # the last token: zeros either way.
    acc = () if accumulator is None else (accumulator,)
    return c.bind_with_k_padded(grouped_kgrouped_p, (a, b, sizes, scale_a, scale_b, *acc),
                                (0, 1), block_size=int(block_size))
