"""Differentiable FP8 matmuls (forward and backward in FP8, the DeepSeek-V3 recipe).

fp8_matmul(x, w): y = x @ w with x [..., K] and w [K, N] in float32/bfloat16.
  forward  y  = Q(x) @ Q(w)        x in 1 x bs blocks, w in bs x bs blocks
  dgrad    dx = Q(dy) @ Q(w)^T     dy in 1 x bs blocks; Q(w) reused: its bs x bs blocks,
                                   read transposed, are exactly what this GEMM needs
  wgrad    dw = Q(x^T) @ Q(dy^T)^T  both 1 x bs along the token axis, float32 accumulation
fp8_grouped_matmul(x, group_sizes, w): the same per expert over contiguous rows, with the
  weight gradient as a k-grouped GEMM (one dW per expert over that expert's rows).

Recipe picks the scaling ("fine_grained" or "per_tensor"), the block size, the FP8
formats of the forward and backward operands, and an escape hatch backward="bf16" that
runs the backward GEMMs in BF16 through XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from . import _dtypes
from .primitives.gemm import gemm
from .primitives.grouped import grouped_contiguous, grouped_kgrouped
from .primitives.quantize import quantize_block, quantize_dual, quantize_tensor

__all__ = ["Recipe", "fp8_matmul", "fp8_grouped_matmul"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a differentiable FP8 matmul quantizes.

    scaling: "fine_grained" (1 x bs activations and gradients, bs x bs weights) or
      "per_tensor" (grouped matmuls: one scale per expert's weights).
    block_size: 64, 128 or 256.
    fwd_dtype / bwd_dtype: FP8 format of forward operands / of the output gradient.
    backward: "fp8", or "bf16" to run both backward GEMMs in BF16 (escape hatch).
    """

    scaling: str = "fine_grained"
    block_size: int = 128
    fwd_dtype: str = "e4m3"
    bwd_dtype: str = "e4m3"
    backward: str = "fp8"

    def __post_init__(self):
        if self.scaling not in ("fine_grained", "per_tensor"):
            raise ValueError(f"scaling must be 'fine_grained' or 'per_tensor', got {self.scaling!r}")
        if self.backward not in ("fp8", "bf16"):
            raise ValueError(f"backward must be 'fp8' or 'bf16', got {self.backward!r}")
        _dtypes.block_size(self.block_size)
        _dtypes.fp8_dtype(self.fwd_dtype)
        _dtypes.fp8_dtype(self.bwd_dtype)

    @property
    def fine(self) -> bool:
        return self.scaling == "fine_grained"


DEFAULT_RECIPE = Recipe()


# ---------------------------------------------------------------------------------------
# Quantizers of 2-D operands, in the layouts the GEMM primitives read.

def _rows(x, dtype, bs):
    """x [R, C] -> (q [R, C], scales [R, ceil(C/bs)]): 1 x bs along C."""
    q, s = quantize_block(x[None], _dtypes.fp8_dtype(dtype), 1, bs)
    return q[0], s[0]


def _rows_t(x, dtype, bs):
    """x [R, C] -> (q [C, R], scales [C, ceil(R/bs)]): transposed, 1 x bs along R."""
    q, s = quantize_block(x[None], _dtypes.fp8_dtype(dtype), 1, bs, transpose=True)
    return q[0], s[0]


def _dual(x, dtype, bs):
    """x [R, C] -> _rows(x), _rows_t(x) from one read of x (a fused kernel)."""
    q, s, qt, st = quantize_dual(x[None], _dtypes.fp8_dtype(dtype), bs)
    return (q[0], s[0]), (qt[0], st[0])


def _tensor(x, dtype):
    q, s = quantize_tensor(x.reshape(1, -1), _dtypes.fp8_dtype(dtype))
    return q.reshape(x.shape), s


# ---------------------------------------------------------------------------------------
# Dense.

def fp8_matmul(x, w, recipe: Recipe | None = None):
    """x [..., K] @ w [K, N] -> [..., N] in FP8, differentiable in x and w.

    Inputs are float32/bfloat16/float16; the result has x's dtype. Gradients: dx in x's
    dtype, dw in w's dtype, computed by FP8 GEMMs (see the module docstring).
    """
    recipe = DEFAULT_RECIPE if recipe is None else recipe
    x, w = _dtypes.float_array(x, "x"), _dtypes.float_array(w, "w")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_matmul needs x [..., K] and w [K, N], got {x.shape} and {w.shape}")
    lead = x.shape[:-1]
    y = _matmul(x.reshape(math.prod(lead), x.shape[-1]), w, recipe, w.dtype)
    return y.reshape(lead + (w.shape[1],))


# w_dtype is static: the gradient of w comes back in it (residuals hold arrays only).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, recipe, w_dtype):
    return _matmul_fwd(x, w, recipe, w_dtype)[0]


def _matmul_fwd(x, w, recipe, w_dtype):
    bs, out = recipe.block_size, _gemm_out(x.dtype)
    if recipe.fine:
        # x^T [K, M] is saved for the weight gradient.
        (qx, sx), saved_x = _dual(x, recipe.fwd_dtype, bs)
        qw, sw = quantize_block(w[None], _dtypes.fp8_dtype(recipe.fwd_dtype), bs, bs)
        qw, sw = qw[0], sw[0]  # [K, N], [K/bs, N/bs]
        y = gemm(qx, qw.T, sx, sw.T, scale_mode="block", block_size=bs, out_dtype=out)
    else:
        qx, sx = _tensor(x, recipe.fwd_dtype)
        qw, sw = _tensor(w, recipe.fwd_dtype)
        y = gemm(qx, qw.T, sx, sw, scale_mode="tensor", block_size=bs, out_dtype=out)
        saved_x = (qx.T, sx)
    bf16_bwd = recipe.backward == "bf16"
    res = (saved_x, (qw, sw), x if bf16_bwd else None, w if bf16_bwd else None)
    return y.astype(x.dtype), res


def _matmul_bwd(recipe, w_dtype, res, dy):
    (qxt, sxt), (qw, sw), x, w = res
    x_dtype = dy.dtype  # y, and so dy, has x's dtype
    if recipe.backward == "bf16":
        dy16 = dy.astype(jnp.bfloat16)
        dx = jnp.dot(dy16, w.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32)
        dw = jnp.dot(x.astype(jnp.bfloat16).T, dy16, preferred_element_type=jnp.float32)
        return dx.astype(x_dtype), dw.astype(w_dtype)
    bs = recipe.block_size
    if recipe.fine:
        # [M, N], [M, N/bs] and [N, M], [N, M/bs]
        (qdy, sdy), (qdyt, sdyt) = _dual(dy, recipe.bwd_dtype, bs)
        dx = gemm(qdy, qw, sdy, sw, scale_mode="block", block_size=bs, out_dtype=_gemm_out(x_dtype))
        dw = gemm(qxt, qdyt, sxt, sdyt, scale_mode="row", block_size=bs, out_dtype=_wgrad_out(w_dtype))
    else:
        qdy, sdy = _tensor(dy, recipe.bwd_dtype)
        dx = gemm(qdy, qw, sdy, sw, scale_mode="tensor", block_size=bs, out_dtype=_gemm_out(x_dtype))
        dw = gemm(qxt, qdy.T, sxt, sdy, scale_mode="tensor", block_size=bs, out_dtype=_wgrad_out(w_dtype))
    return dx.astype(x_dtype), dw.astype(w_dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _gemm_out(dtype):
    return jnp.float32 if jnp.dtype(dtype) == jnp.float32 else jnp.bfloat16


def _wgrad_out(w_dtype):
    """The weight gradient's GEMM output: accumulated in float32 either way, written in w's
    dtype when that is bfloat16 (the kernel rounds as astype would, and the float32 array,
    twice the bytes, never goes through memory), else in float32 (then cast once)."""
    return jnp.bfloat16 if jnp.dtype(w_dtype) == jnp.bfloat16 else jnp.float32


# ---------------------------------------------------------------------------------------
# Grouped (MoE experts).

def fp8_grouped_matmul(x, group_sizes, w, recipe: Recipe | None = None):
    """Per expert g: out[rows of g] = x[rows of g] @ w[g], in FP8, differentiable in x, w.

    x [M_total, K] float (rows of expert g contiguous), group_sizes [G] int (device array;
    rows past the sum give zeros and get zero gradient), w [G, K, N] float. Returns
    [M_total, N] in x's dtype.
    """
    recipe = DEFAULT_RECIPE if recipe is None else recipe
    x, w = _dtypes.float_array(x, "x"), _dtypes.float_array(w, "w")
    if x.ndim != 2 or w.ndim != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(
            f"fp8_grouped_matmul needs x [M, K] and w [G, K, N], got {x.shape} and {w.shape}")
    sizes = _dtypes.group_sizes(group_sizes, "group_sizes", w.shape[0])
    return _grouped(x, sizes, w, recipe, w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(x, sizes, w, recipe, w_dtype):
    return _grouped_fwd(x, sizes, w, recipe, w_dtype)[0]


def _quantize_experts(w, recipe):
    """w [G, K, N] -> (q [G, K, N], scales [G, K/bs, N/bs] or [G])."""
    fp8, bs = _dtypes.fp8_dtype(recipe.fwd_dtype), recipe.block_size
    if recipe.fine:
        return quantize_block(w, fp8, bs, bs)
    q, s = quantize_tensor(w.reshape(w.shape[0], -1), fp8)
    return q.reshape(w.shape), s


def _grouped_fwd(x, sizes, w, recipe, w_dtype):
    bs, out = recipe.block_size, _gemm_out(x.dtype)
    mode = "block" if recipe.fine else "tensor"
    qw, sw = _quantize_experts(w, recipe)
    # The weight gradient reads x^T quantized 1 x bs along the tokens, whatever the scaling.
    if recipe.fine:
        (qx, sx), saved_x = _dual(x, recipe.fwd_dtype, bs)
        sw_nk = jnp.swapaxes(sw, 1, 2)
    else:
        qx, sx = _tensor(x, recipe.fwd_dtype)
        sx, sw_nk = jnp.broadcast_to(sx, (w.shape[0],)), sw
        saved_x = _rows_t(x, recipe.fwd_dtype, bs)
    y = grouped_contiguous(qx[None], sizes[None], jnp.swapaxes(qw, 1, 2)[None], sx[None],
                           sw_nk[None], scale_mode=mode, block_size=bs, out_dtype=out)[0]
    bf16_bwd = recipe.backward == "bf16"
    res = (x if bf16_bwd else None, saved_x, sizes, (qw, sw), w if bf16_bwd else None)
    return y.astype(x.dtype), res


def _grouped_bwd(recipe, w_dtype, res, dy):
    x, (qxt, sxt), sizes, (qw, sw), w = res
    g = qw.shape[0]
    if recipe.backward == "bf16":
        bf = jnp.bfloat16
        dx = jax.lax.ragged_dot(dy.astype(bf), jnp.swapaxes(w, 1, 2).astype(bf), sizes,
                                preferred_element_type=jnp.float32)
        dw = _ragged_wgrad(x.astype(bf), dy.astype(bf), sizes, g)
        return dx.astype(x.dtype), None, dw.astype(w_dtype)
    bs, x_dtype = recipe.block_size, dy.dtype  # y, and so dy, has x's dtype
    if recipe.fine:
        (qdy, sdy), (qdyt, sdyt) = _dual(dy, recipe.bwd_dtype, bs)
        mode = "block"
    else:
        qdy, sdy = _tensor(dy, recipe.bwd_dtype)
        sdy, mode = jnp.broadcast_to(sdy, (g,)), "tensor"
        qdyt, sdyt = _rows_t(dy, recipe.bwd_dtype, bs)
    # dgrad: dx[rows of g] = dy[rows of g] @ w[g]^T; w[g] [K, N] is already K-major for it.
    dx = grouped_contiguous(qdy[None], sizes[None], qw[None], sdy[None], sw[None],
                            scale_mode=mode, block_size=bs, out_dtype=_gemm_out(x_dtype))[0]
    # wgrad: dw[g] = x[rows of g]^T @ dy[rows of g], k-grouped over the token axis.
    dw = grouped_kgrouped(qxt[None], qdyt[None], sizes[None], sxt[None], sdyt[None],
                          block_size=bs)[0]
    return dx.astype(x_dtype), None, dw.astype(w_dtype)


def _ragged_wgrad(x, dy, sizes, groups):
    """dw[g] = x_g^T dy_g in BF16 through XLA (the backward="bf16" escape hatch)."""
    ends = jnp.cumsum(jnp.maximum(sizes, 0))
    starts = ends - jnp.maximum(sizes, 0)
    rows = jnp.arange(x.shape[0])
    member = (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])  # [G, M]
    xm = jnp.where(member[:, :, None], x[None], 0)
    return jnp.einsum("gmk,mn->gkn", xm, dy, preferred_element_type=jnp.float32)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
