"""Dense GEMM primitive.

gemm_p(a [M, K] fp8, b [N, K] fp8, scale_a, scale_b[, accumulator [M, N] f32]) -> [M, N]
with both operands K-major. scale_mode:
  "tensor": scale_a [1], scale_b [1]
  "block":  scale_a [M, ceil(K/bs)], scale_b [ceil(N/bs), ceil(K/bs)]   (1D2D)
  "row":    scale_a [M, ceil(K/bs)], scale_b [N, ceil(K/bs)]            (1D1D, wgrad)
out = accumulator + sum_kb (scale_a * scale_b) * (a @ b^T over K block kb).

Batching: a vmapped `a` (and its row scales and accumulator) folds into M: one call.
A vmapped `b` becomes one batched call: the masked grouped GEMM (tensor and block scales)
or the k-grouped GEMM (row scales), with one group per batch entry.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.interpreters import batching

from .. import _ffi
from . import _common as c

gemm_p = c.make_primitive("gemm")


def scale_shapes(scale_mode, m, n, k, block_size):
    kb = c.cdiv(k, block_size)
    if scale_mode == "tensor":
        return (1,), (1,)
    if scale_mode == "block":
        return (m, kb), (c.cdiv(n, block_size), kb)
    return (m, kb), (n, kb)


def _abstract_eval(a, b, scale_a, scale_b, *acc, scale_mode, block_size, out_dtype):
    c.check_fp8("a", a)
    c.check_fp8("b", b)
    c.check_rank("a", a, 2, "[M, K]")
    c.check_rank("b", b, 2, "[N, K]")
    (m, k), n = a.shape, b.shape[0]
    c.check_shape("b", b, (n, k), f"[N, K] with a's K = {k}")
    c.check_f32("scale_a", scale_a)
    c.check_f32("scale_b", scale_b)
    sa, sb = scale_shapes(scale_mode, m, n, k, block_size)
    c.check_shape("scale_a", scale_a, sa, f"{scale_mode} scales, block {block_size}")
    c.check_shape("scale_b", scale_b, sb, f"{scale_mode} scales, block {block_size}")
    c.check_out(out_dtype)
    if acc:
        c.check_f32("accumulator", acc[0])
        c.check_shape("accumulator", acc[0], (m, n))
        if jnp.dtype(out_dtype) != jnp.float32:
            raise ValueError("accumulating into an existing array needs out_dtype float32")
    return c.shaped((m, n), out_dtype)


def _batch(args, dims, *, scale_mode, block_size, out_dtype):
    size = c.mapped_size(args, dims)
    a, b, sa, sb, *acc = args
    da, db, dsa, dsb, *dacc = dims
    params = dict(scale_mode=scale_mode, block_size=block_size, out_dtype=out_dtype)
    a = c.move_to_front(a, da, size)  # [V, M, K]
    (m, k), n = a.shape[1:], c.unmapped_shape(b, db)[0]
    acc = [c.move_to_front(acc[0], dacc[0], size)] if acc else []

    weights_mapped = db is not c.not_mapped or dsb is not c.not_mapped
    if not weights_mapped and (scale_mode != "tensor" or dsa is c.not_mapped):
        # One call over V * M rows.
        if scale_mode != "tensor":
            sa = c.merge_leading(c.move_to_front(sa, dsa, size))
        acc = [c.merge_leading(x) for x in acc]
        out = gemm_p.bind(c.merge_leading(a), b, sa, sb, *acc, **params)
        return out.reshape(size, m, n), 0

    sa = c.move_to_front(sa, dsa, size)
    if weights_mapped:
        b, sb = c.move_to_front(b, db, size), c.move_to_front(sb, dsb, size)
    else:
        b, sb = b[None], sb[None]  # shared by every batch entry

    if scale_mode == "row":
        # k-grouped GEMM with one group spanning all of K: out[v] = a[v] @ b[v]^T.
        from .grouped import grouped_kgrouped_p
        b, sb = (jnp.broadcast_to(x, (size,) + x.shape[1:]) for x in (b, sb))
        sizes = jnp.full((size, 1), k, jnp.int32)
        acc = [x[:, None] for x in acc]
        out = grouped_kgrouped_p.bind(a, b, sizes, sa, sb, *acc, block_size=block_size)
        return out[:, 0].astype(out_dtype), 0

    # Masked grouped GEMM: batch entry v is group 0 of batch v, with all M rows valid.
    # A per-tensor scale [1] already has the group axis; block scales get one.
    from .grouped import grouped_masked_p
    group_axis = (lambda s: s) if scale_mode == "tensor" else (lambda s: s[:, None])
    sizes = jnp.full((size, 1), m, jnp.int32)
    out = grouped_masked_p.bind(
        a[:, None], sizes, b[:, None], group_axis(sa), group_axis(sb),
        **{**params, "out_dtype": jnp.dtype(jnp.float32) if acc else out_dtype})[:, 0]
    if acc:
        out = (out + acc[0]).astype(out_dtype)
    return out, 0


gemm_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[gemm_p] = _batch
_ffi.register_lowering(
    gemm_p, "gemm",
    lambda scale_mode, block_size, out_dtype: dict(
        scale_mode=c.SCALE_MODES[scale_mode], block_size=int(block_size)),
    aliases=lambda n: {4: 0} if n == 5 else None)


def gemm(a, b, scale_a, scale_b, accumulator=None, *, scale_mode, block_size, out_dtype):
    acc = () if accumulator is None else (accumulator,)
    return c.bind_with_k_padded(gemm_p, (a, b, scale_a, scale_b, *acc), (0, 1),
                                scale_mode=scale_mode, block_size=int(block_size),
                                out_dtype=jnp.dtype(out_dtype))
