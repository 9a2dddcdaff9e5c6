"""Flax layers on the FP8 GEMMs: drop-in replacements for Dense / Linear, and an MoE block.

This module needs flax (`pip install flax`); `import jax_fp8gemm` does not import it, so
the rest of the package works without flax. Import it explicitly:

    from jax_fp8gemm.flax import FP8Dense, FP8Linear, FP8MoE, FP8MoELayer, quantize_params

Linen
  FP8Dense       flax.linen.Dense with the matmul in FP8 (forward and backward, see
                 jax_fp8gemm.fp8_matmul). Same fields, same params ('kernel' [in, features],
                 'bias' [features]): an nn.Dense checkpoint loads into it unchanged.
                 quantized=True is the inference form: FP8 weights, quantized once
                 (quantize_params), half the memory of bf16 weights.
  FP8MoE         a top-k routed, dropless Mixture-of-Experts block with SwiGLU experts whose
                 two GEMMs run as differentiable grouped FP8 GEMMs. Returns (y, aux_loss).
  quantize_params  float param tree -> the tree that FP8Dense(quantized=True) reads.

NNX
  FP8Linear      flax.nnx.Linear with the matmul in FP8; the same `kernel` / `bias` Params.
  FP8MoELayer    the NNX counterpart of FP8MoE.

Numerics: activations (and output gradients) are quantized 1 x bs, weights bs x bs, with
the scaling, block size and FP8 formats of `recipe` (jax_fp8gemm.Recipe). Results are
close to, not equal to, the float layers' (calc_diff ~1e-3 for e4m3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict, freeze, unfreeze
from flax.linen import dtypes as linen_dtypes
from flax.nnx.nn import dtypes as nnx_dtypes

from . import _dtypes
from .autodiff import Recipe, fp8_grouped_matmul, fp8_matmul
from .gemm import fp8_gemm, fp8_gemm_fine_grained
from .grouped import permute_tokens, unpermute_tokens
from .quantization import quantize_fp8, quantize_fp8_fine_grained

__all__ = [
    "FP8Dense",
    "FP8Linear",
    "FP8MoE",
    "FP8MoELayer",
    "quantize_params",
    "quantize_kernel",
    "moe_forward",
    "default_kernel_init",
    "default_expert_init",
]

Array = jax.Array
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.lecun_normal()
# Expert weights [E, fan_in, fan_out]: lecun normal per expert.
default_expert_init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))

_QUANT_KERNEL = "kernel_fp8_nk"
_QUANT_SCALE = "kernel_scale"


def _gemm_out(dtype):
    return jnp.float32 if jnp.dtype(dtype) == jnp.float32 else jnp.bfloat16


def _add_bias(y, bias):
    if bias is None:
        return y
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


# ---------------------------------------------------------------------------------------
# Inference form: weights quantized once, stored [features, in] (K-major).

def quantize_kernel(kernel, recipe: Recipe | None = None):
    """kernel [in, features] float -> (kernel_fp8_nk [features, in], kernel_scale).

    The FP8 kernel is stored transposed, [N, K] ("nk"): the FP8 GEMMs read both operands
    K-major, so this is their fast path; a [K, N] kernel would be transposed on every call.
    kernel_scale describes kernel_fp8_nk as stored: bs x bs block scales
    [ceil(features/bs), ceil(in/bs)] for recipe.scaling="fine_grained", a float32 scalar
    for "per_tensor". The FP8 format is recipe.fwd_dtype.
    """
    recipe = Recipe() if recipe is None else recipe
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must have shape [in, features], got {kernel.shape}")
    w_nk = kernel.T
    if recipe.fine:
        bs = recipe.block_size
        return quantize_fp8_fine_grained(w_nk, bs, recipe.fwd_dtype, block_shape=(bs, bs))
    return quantize_fp8(w_nk, recipe.fwd_dtype)


def _quantized_matmul(x, kernel_fp8_nk, kernel_scale, recipe, compute_dtype):
    """x [..., K] float @ dequant(kernel_fp8_nk [N, K])^T -> [..., N] in compute_dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = kernel_fp8_nk.shape[0]
    x2 = x.reshape(math.prod(lead), k)
    out = _gemm_out(compute_dtype)
    if recipe.fine:
        qx, sx = quantize_fp8_fine_grained(x2, recipe.block_size, recipe.fwd_dtype)
        y = fp8_gemm_fine_grained(qx, kernel_fp8_nk, sx, kernel_scale, recipe.block_size,
                                  out_dtype=out, b_layout="nk")
    else:
        qx, sx = quantize_fp8(x2, recipe.fwd_dtype)
        y = fp8_gemm(qx, kernel_fp8_nk, sx, kernel_scale, out_dtype=out, b_layout="nk")
    return y.astype(compute_dtype).reshape(lead + (n,))


def quantize_params(params, recipe: Recipe | None = None,
                    predicate: Callable[[tuple], bool] | None = None):
    """Converts a float param tree to the one FP8Dense(quantized=True) reads.

    Walks the (nested dict or FrozenDict) tree; every dict holding a 2-D 'kernel' leaf
    (every Dense-like layer: FP8Dense, nn.Dense, ...) for which `predicate(path)` is true
    (default: all of them; `path` is the tuple of keys leading to the dict, e.g.
    ('params', 'Dense_0')) gets 'kernel' replaced by 'kernel_fp8_nk' and 'kernel_scale'
    (see quantize_kernel); its other entries ('bias') are kept as they are. Use the same
    `recipe` (scaling, block_size, fwd_dtype) for the FP8Dense(quantized=True) layers.

    Every 2-D 'kernel' means every one: a layer that is to stay float (a plain nn.Dense
    that is not swapped for FP8Dense in the inference model) must be excluded with
    `predicate`. FP8MoE's router and expert weights are not named 'kernel' and are left
    alone. Accepts a variables dict ({'params': ...}) or the params alone; returns the
    same kind of container.
    """
    recipe = Recipe() if recipe is None else recipe
    frozen = isinstance(params, FrozenDict)
    tree = unfreeze(params) if frozen else params

    def walk(node, path):
        if not isinstance(node, Mapping):
            return node
        kernel = node.get("kernel")
        if (kernel is not None and hasattr(kernel, "ndim") and kernel.ndim == 2
                and (predicate is None or predicate(path))):
            q, s = quantize_kernel(kernel, recipe)
            out = {k: walk(v, path + (k,)) for k, v in node.items() if k != "kernel"}
            out[_QUANT_KERNEL], out[_QUANT_SCALE] = q, s
            return out
        return {k: walk(v, path + (k,)) for k, v in node.items()}

    out = walk(tree, ())
    return freeze(out) if frozen else out


# ---------------------------------------------------------------------------------------
# Linen Dense.

class FP8Dense(nn.Module):
    """flax.linen.Dense with its matmul in FP8: a drop-in replacement.

    Attributes (as nn.Dense):
      features: the number of output features.
      use_bias: whether to add a bias (default True).
      dtype: the computation dtype (default: promoted from the input and params, as
        nn.Dense). Must come out as float32, bfloat16 or float16.
      param_dtype: the dtype of the params (default float32).
      precision: accepted for compatibility and ignored: the precision is set by `recipe`.
      kernel_init, bias_init: initializers, as nn.Dense's defaults.
    Attributes (FP8):
      recipe: a jax_fp8gemm.Recipe (scaling, block size, FP8 formats, backward).
      quantized: False (training form): params 'kernel' [in, features] and 'bias'
        [features], exactly nn.Dense's; x @ kernel runs through fp8_matmul, which
        quantizes both on every call and is differentiable (FP8 forward and backward).
        True (inference form): params 'kernel_fp8_nk' (FP8 [features, in], K-major: the
        GEMM's fast path), 'kernel_scale' (float32 block scales of it, [ceil(features/bs),
        ceil(in/bs)], or a scalar for per-tensor scaling) and 'bias'. Only x is quantized
        per call. Build the params with quantize_params from a trained float tree. This
        form is inference-only: the FP8 GEMM has no derivative rules, so neither the FP8
        params nor the input can be differentiated through it.

    nn.Dense's `dot_general`, `dot_general_cls` and `promote_dtype` fields are not
    supported (the product is always the FP8 GEMM).

    Auto-naming: linen names an unnamed submodule after its class (nn.Dense -> 'Dense_0',
    'Dense_1', ...). So that a model whose nn.Dense layers are swapped for FP8Dense keeps
    its param paths (and loads nn.Dense checkpoints), FP8Dense's class __name__ is
    'Dense': unnamed FP8Dense layers are 'Dense_<n>' too, counted together with any
    nn.Dense layers of the same parent. Pass name= to choose another name.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    recipe: Recipe = Recipe()
    quantized: bool = False

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        inputs = jnp.asarray(inputs)
        k = jnp.shape(inputs)[-1]
        if self.quantized:
            return self._quantized_call(inputs, k)
        kernel = self.param("kernel", self.kernel_init, (k, self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = linen_dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = fp8_matmul(inputs, kernel, self.recipe)
        return _add_bias(y, bias)

    def _quantized_call(self, inputs, k):
        recipe = self.recipe
        cache = {}

        def init_quantized(rng):  # one float draw gives both params (shapes for eval_shape)
            if "q" not in cache:
                w = self.kernel_init(rng, (k, self.features), self.param_dtype)
                cache["q"] = quantize_kernel(w, recipe)
            return cache["q"]

        kq = self.param(_QUANT_KERNEL, lambda rng: init_quantized(rng)[0])
        ks = self.param(_QUANT_SCALE, lambda rng: init_quantized(rng)[1])
        if kq.shape != (self.features, k) or kq.dtype not in _dtypes.FP8_DTYPES:
            raise ValueError(
                f"{_QUANT_KERNEL} must be FP8 [features, in] = ({self.features}, {k}), got "
                f"{kq.dtype} {kq.shape} (build it with quantize_params)")
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        dtype = self.dtype
        if dtype is None:
            dtype = linen_dtypes.canonicalize_dtype(inputs, jnp.zeros((), self.param_dtype))
        inputs = inputs.astype(dtype)
        y = _quantized_matmul(inputs, kq, ks, recipe, dtype)
        return _add_bias(y, None if bias is None else bias.astype(dtype))

    def __repr__(self):
        text = super().__repr__()
        return "FP8" + text if text.startswith("Dense") else text


# Linen auto-names submodules after type(module).__name__: 'Dense_<n>', as nn.Dense (see
# the class docstring). __qualname__ (pickling, tracebacks) stays FP8Dense.
FP8Dense.__name__ = "Dense"


# ---------------------------------------------------------------------------------------
# NNX Linear.

class FP8Linear(nnx.Module):
    """flax.nnx.Linear with its matmul in FP8 (jax_fp8gemm.fp8_matmul, differentiable).

    Same constructor and the same state as nnx.Linear: `kernel` (nnx.Param [in, out]) and
    `bias` (nnx.Param [out], or None without bias), so nnx.split / merge / state,
    checkpoints and nnx.Optimizer treat it as they treat nnx.Linear. `precision` is
    accepted and ignored; `recipe` picks the FP8 scaling (jax_fp8gemm.Recipe).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Initializer = default_kernel_init,
                 bias_init: Initializer = nn.initializers.zeros_init(),
                 recipe: Recipe = Recipe(), rngs: nnx.Rngs):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.recipe = recipe

    def __call__(self, inputs: Array) -> Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = nnx_dtypes.promote_dtype((jnp.asarray(inputs), kernel, bias),
                                                        dtype=self.dtype)
        return _add_bias(fp8_matmul(inputs, kernel, self.recipe), bias)


# ---------------------------------------------------------------------------------------
# Mixture of Experts.

def moe_forward(x, router_kernel, w1, w2, *, top_k: int = 2, recipe: Recipe | None = None,
                dtype=None):
    """Top-k routed, dropless MoE with SwiGLU experts in FP8. Returns (y, aux_loss).

    x [..., H]; router_kernel [H, E]; w1 [E, H, 2F] (gate then up projection, side by
    side); w2 [E, F, H]. Per token: router probabilities softmax(x @ router_kernel) (in
    float32), its top_k experts with weights renormalized to sum to 1, and
    y = sum_k weight_k * (silu(x @ w1g) * (x @ w1u)) @ w2 of expert k.

    Dropless dispatch: the T*top_k (token, expert) assignments are sorted by expert, the
    token rows gathered, and both expert GEMMs run as one fp8_grouped_matmul each over the
    contiguous rows of every expert (group sizes on the device; empty experts are fine),
    differentiable in x, the weights and (through the routing weights) the router. Outputs
    are scattered back with a segment sum.

    aux_loss is the Switch Transformer load-balancing loss E * sum_e f_e * P_e, f_e the
    fraction of assignments routed to expert e and P_e the mean router probability of e:
    1 when balanced, up to E when all tokens go to one expert. It has gradients through P.
    """
    recipe = Recipe() if recipe is None else recipe
    x = jnp.asarray(x)
    e, h, f2 = w1.shape
    f = w2.shape[1]
    if (x.shape[-1] != h or router_kernel.shape != (h, e) or f2 != 2 * f
            or w2.shape != (e, f, h)):
        raise ValueError(
            f"inconsistent MoE shapes: x {x.shape}, router_kernel {router_kernel.shape}, w1 "
            f"{w1.shape}, w2 {w2.shape}; expected x [..., H], router [H, E], w1 [E, H, 2F], "
            f"w2 [E, F, H]")
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, num_experts={e}], got {top_k}")
    lead = x.shape[:-1]
    xt = x.reshape(-1, h)
    t = xt.shape[0]

    logits = jnp.dot(xt.astype(jnp.float32), router_kernel.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)                          # [T, E]
    top_p, top_i = jax.lax.top_k(probs, top_k)                       # [T, k]
    top_w = top_p / jnp.sum(top_p, axis=-1, keepdims=True)

    xc, w1c, w2c = linen_dtypes.promote_dtype(xt, w1, w2, dtype=dtype)
    xs, sizes, order = permute_tokens(xc, top_i, e)                  # [T*k, H], [E]
    hid = fp8_grouped_matmul(xs, sizes, w1c, recipe)                 # [T*k, 2F]
    hid = hid.astype(jnp.float32)
    act = (jax.nn.silu(hid[:, :f]) * hid[:, f:]).astype(xc.dtype)
    out = fp8_grouped_matmul(act, sizes, w2c, recipe)                # [T*k, H]
    y = unpermute_tokens(out, order, top_w, t).reshape(lead + (h,))

    frac = sizes.astype(jnp.float32) / (t * top_k)
    aux = e * jnp.sum(frac * jnp.mean(probs, axis=0))
    return y, aux


class FP8MoE(nn.Module):
    """Linen MoE block: router + top-k dropless dispatch + SwiGLU experts in FP8.

    __call__(x [..., H]) -> (y [..., H], aux_loss scalar); aux_loss is also sown as
    ('intermediates', 'aux_loss') (apply with mutable=['intermediates'] to collect it).
    See moe_forward for the computation.

    Attributes:
      num_experts: E.
      ffn: each expert's inner size F.
      top_k: experts per token (default 2).
      recipe: jax_fp8gemm.Recipe for the expert GEMMs.
      dtype: computation dtype of the experts (default: promoted from x and params). The
        router always computes in float32.
      param_dtype: dtype of all params (default float32).
      kernel_init: initializer of 'w1' [E, H, 2F] and 'w2' [E, F, H] (default lecun
        normal per expert).
      router_init: initializer of 'router_kernel' [H, E].
    Params: 'router_kernel', 'w1', 'w2' (no 'kernel': quantize_params leaves them alone).
    """

    num_experts: int
    ffn: int
    top_k: int = 2
    recipe: Recipe = Recipe()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_expert_init
    router_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: Array):
        x = jnp.asarray(x)
        h, e, f = x.shape[-1], self.num_experts, self.ffn
        router = self.param("router_kernel", self.router_init, (h, e), self.param_dtype)
        w1 = self.param("w1", self.kernel_init, (e, h, 2 * f), self.param_dtype)
        w2 = self.param("w2", self.kernel_init, (e, f, h), self.param_dtype)
        y, aux = moe_forward(x, router, w1, w2, top_k=self.top_k, recipe=self.recipe,
                             dtype=self.dtype)
        self.sow("intermediates", "aux_loss", aux)
        return y, aux


class FP8MoELayer(nnx.Module):
    """NNX MoE block, the counterpart of FP8MoE: FP8MoELayer(hidden, ffn, num_experts, *,
    top_k=2, recipe, dtype, param_dtype, kernel_init, router_init, rngs).

    Params: router_kernel [H, E], w1 [E, H, 2F], w2 [E, F, H] (nnx.Param).
    __call__(x [..., H]) -> (y [..., H], aux_loss); see moe_forward.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, *, top_k: int = 2,
                 recipe: Recipe = Recipe(), dtype: Any = None, param_dtype: Any = jnp.float32,
                 kernel_init: Initializer = default_expert_init,
                 router_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.router_kernel = nnx.Param(router_init(rngs.params(), (hidden, num_experts), param_dtype))
        self.w1 = nnx.Param(kernel_init(rngs.params(), (num_experts, hidden, 2 * ffn), param_dtype))
        self.w2 = nnx.Param(kernel_init(rngs.params(), (num_experts, ffn, hidden), param_dtype))
        self.hidden, self.ffn, self.num_experts, self.top_k = hidden, ffn, num_experts, top_k
        self.recipe, self.dtype, self.param_dtype = recipe, dtype, param_dtype

    def __call__(self, x: Array):
        return moe_forward(x, self.router_kernel[...], self.w1[...], self.w2[...],
                           top_k=self.top_k, recipe=self.recipe, dtype=self.dtype)
