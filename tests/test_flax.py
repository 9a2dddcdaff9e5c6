"""The Flax layers (jax_fp8gemm.flax): drop-in Dense / Linear, quantized inference, MoE."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

from jax_fp8gemm import Recipe  # noqa: E402
from jax_fp8gemm.flax import (FP8Dense, FP8Linear, FP8MoE, FP8MoELayer,  # noqa: E402
                              quantize_params)
from helpers import calc_diff  # noqa: E402


def shapes_dtypes(tree):
    return jax.tree_util.tree_map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


def nbytes(tree):
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree))


def test_package_imports_without_flax_module(tmp_path):
    """`import jax_fp8gemm` must not pull in flax (the layers are opt-in)."""
    import os
    import subprocess
    import sys

    import jax_fp8gemm
    # Import the package this test process uses (installed or the dev tree), from a
    # directory that is not the checkout (whose sources have no compiled extension).
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(jax_fp8gemm.__file__)))
    code = "import sys, jax_fp8gemm; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


# ---------------------------------------------------------------------------------------
# Linen Dense.

@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_fp8_dense_is_nn_dense_drop_in(device, dtype):
    x = jax.random.normal(jax.random.key(1), (3, 5, 200))  # leading axes, partial blocks
    ref_layer = nn.Dense(300, dtype=dtype)
    layer = FP8Dense(300, dtype=dtype)
    ref_params = ref_layer.init(jax.random.key(0), x)
    params = layer.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref_params)
    assert shapes_dtypes(params) == shapes_dtypes(ref_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)  # same init

    ref = ref_layer.apply(ref_params, x)
    y = jax.jit(layer.apply)(ref_params, x)  # nn.Dense's checkpoint, unchanged
    assert y.shape == ref.shape == (3, 5, 300) and y.dtype == ref.dtype
    assert calc_diff(y, ref) < 2e-3


class MLP(nn.Module):
    dense_cls: type = nn.Dense
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(self.dense_cls(self.hidden)(x))
        x = nn.gelu(self.dense_cls(self.hidden)(x))
        return self.dense_cls(1)(x)[..., 0]


def regression_data(n=256, d=32):
    kx, ka, kb = jax.random.split(jax.random.key(42), 3)
    x = jax.random.normal(kx, (n, d))
    y = jnp.tanh(x @ jax.random.normal(ka, (d, 16)) / np.sqrt(d)) @ jax.random.normal(kb, (16,))
    return x, y


def linen_train_step(model, tx):
    def loss_fn(params, x, y):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train_linen(dense_cls, steps=30):
    x, y = regression_data()
    model = MLP(dense_cls)
    params = model.init(jax.random.key(0), x)
    tx = optax.adam(5e-3)
    opt_state = tx.init(params)
    step = jax.jit(linen_train_step(model, tx))
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    return np.array(losses), params


def test_fp8_dense_trains_like_nn_dense(device):
    """MLP(dense_cls=FP8Dense) vs MLP(dense_cls=nn.Dense), nothing else changed: the same
    param paths (auto-named Dense_<n>), the same initial params, nearly the same losses."""
    x, _ = regression_data(8)
    ref_init = MLP(nn.Dense).init(jax.random.key(0), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, MLP(FP8Dense).init(jax.random.key(0), x),
                           ref_init)
    ref_losses, _ = train_linen(nn.Dense)
    losses, params = train_linen(FP8Dense)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.3 * losses[0], losses
    assert abs(losses[-1] - ref_losses[-1]) < 0.1 * ref_losses[-1], (losses[-1], ref_losses[-1])
    assert all(jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(params))


def test_train_step_calls_fp8_kernels(device):
    """The train step compiled for the device runs the FP8 FFI kernels (quantization and
    GEMMs: on a GPU the CUDA handlers, the only lowering there) and nn.Dense's runs none."""
    x, y = regression_data(64)
    tx = optax.adam(5e-3)
    texts = {}
    for name, cls in (("fp8", FP8Dense), ("ref", nn.Dense)):
        model = MLP(cls)
        params = model.init(jax.random.key(0), x)
        opt_state = tx.init(params)
        compiled = jax.jit(linen_train_step(model, tx)).lower(params, opt_state, x, y).compile()
        texts[name] = compiled.as_text()
        new_params, _, loss = compiled(params, opt_state, x, y)
        assert np.isfinite(float(loss))
        assert {d for leaf in jax.tree_util.tree_leaves(new_params) for d in leaf.devices()} == {device}
    assert 'custom_call_target="jax_fp8gemm_gemm_v1"' in texts["fp8"]
    assert 'custom_call_target="jax_fp8gemm_quantize_block_v1"' in texts["fp8"]
    assert "jax_fp8gemm_" not in texts["ref"]


# ---------------------------------------------------------------------------------------
# Quantized inference.

@pytest.mark.parametrize("scaling", ["fine_grained", "per_tensor"])
def test_quantize_params_inference(device, scaling):
    recipe = Recipe(scaling=scaling)
    x = jax.random.normal(jax.random.key(3), (4, 16, 256))
    float_model = MLP(functools.partial(FP8Dense, recipe=recipe), hidden=256)
    params = MLP(nn.Dense, hidden=256).init(jax.random.key(0), x)  # an nn.Dense checkpoint
    qparams = quantize_params(params, recipe)

    bs = recipe.block_size
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        layer, flayer = qparams["params"][name], params["params"][name]
        assert set(layer) == {"kernel_fp8_nk", "kernel_scale", "bias"}
        k, n = flayer["kernel"].shape
        assert layer["kernel_fp8_nk"].shape == (n, k)
        assert layer["kernel_fp8_nk"].dtype == jnp.float8_e4m3fn
        want = (-(-n // bs), -(-k // bs)) if scaling == "fine_grained" else ()
        assert layer["kernel_scale"].shape == want and layer["kernel_scale"].dtype == jnp.float32
        assert layer["bias"] is flayer["bias"]
    bf16_bytes = nbytes(jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params))
    assert nbytes(qparams) < 0.55 * bf16_bytes

    q_model = MLP(functools.partial(FP8Dense, recipe=recipe, quantized=True), hidden=256)
    assert shapes_dtypes(q_model.init(jax.random.key(0), x)) == shapes_dtypes(qparams)
    y_q = jax.jit(q_model.apply)(qparams, x)
    y_float = MLP(nn.Dense, hidden=256).apply(params, x)
    assert y_q.shape == y_float.shape and y_q.dtype == y_float.dtype
    assert calc_diff(y_q, y_float) < 1e-2  # three layers' FP8 errors
    # Weights quantized once or on every call: the same FP8 values, the same GEMM.
    np.testing.assert_array_equal(y_q, jax.jit(float_model.apply)(params, x))

    # One layer: close to nn.Dense.
    layer = {"params": qparams["params"]["Dense_0"]}
    y1 = FP8Dense(256, recipe=recipe, quantized=True).apply(layer, x)
    ref1 = nn.Dense(256).apply({"params": params["params"]["Dense_0"]}, x)
    assert y1.dtype == ref1.dtype and calc_diff(y1, ref1) < 2e-3


def test_quantize_params_predicate():
    x = jnp.ones((2, 8))
    params = MLP(nn.Dense, hidden=16).init(jax.random.key(0), x)
    q = quantize_params(flax.core.freeze(params), predicate=lambda path: path[-1] != "Dense_2")
    assert isinstance(q, flax.core.FrozenDict)
    assert "kernel_fp8_nk" in q["params"]["Dense_0"] and "kernel_fp8_nk" in q["params"]["Dense_1"]
    assert set(q["params"]["Dense_2"]) == {"kernel", "bias"}


# ---------------------------------------------------------------------------------------
# NNX Linear.

def test_fp8_linear_state_matches_nnx_linear(device):
    ref = nnx.Linear(200, 300, rngs=nnx.Rngs(0))
    layer = FP8Linear(200, 300, rngs=nnx.Rngs(0))
    s_ref, s = nnx.state(ref), nnx.state(layer)
    assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(s_ref)
    assert shapes_dtypes(s) == shapes_dtypes(s_ref)
    jax.tree_util.tree_map(np.testing.assert_array_equal, s, s_ref)
    x = jax.random.normal(jax.random.key(1), (3, 5, 200))
    assert calc_diff(layer(x), ref(x)) < 2e-3

    graphdef, state = nnx.split(layer)
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(again(x), layer(x))
    nnx.update(layer, nnx.state(ref))  # nnx.Linear's state loads as is
    np.testing.assert_array_equal(layer.kernel[...], ref.kernel[...])


class NNXMLP(nnx.Module):
    def __init__(self, linear_cls, d, hidden, *, rngs):
        self.l1 = linear_cls(d, hidden, rngs=rngs)
        self.l2 = linear_cls(hidden, hidden, rngs=rngs)
        self.l3 = linear_cls(hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.gelu(self.l2(nnx.gelu(self.l1(x)))))[..., 0]


def train_nnx(linear_cls, steps=30):
    x, y = regression_data()
    model = NNXMLP(linear_cls, x.shape[1], 64, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(5e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    return np.array([float(step(model, optimizer, x, y)) for _ in range(steps)]), model


def test_fp8_linear_trains_in_nnx():
    ref_losses, _ = train_nnx(nnx.Linear)
    losses, model = train_nnx(FP8Linear)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.3 * losses[0], losses
    assert abs(losses[-1] - ref_losses[-1]) < 0.1 * ref_losses[-1], (losses[-1], ref_losses[-1])
    x, _ = regression_data(8)
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), model(x))


# ---------------------------------------------------------------------------------------
# MoE.

def moe_reference(x, router, w1, w2, top_k):
    """float64, token by token and expert by expert."""
    x, router, w1, w2 = (np.asarray(a, np.float64) for a in (x, router, w1, w2))
    xt = x.reshape(-1, x.shape[-1])
    e, f = w1.shape[0], w2.shape[1]
    logits = xt @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.zeros_like(xt)
    counts = np.zeros(e)
    for t in range(xt.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:top_k]
        weights = probs[t, top] / probs[t, top].sum()
        for g, wgt in zip(top, weights):
            counts[g] += 1
            h = xt[t] @ w1[g]
            gate, up = h[:f], h[f:]
            y[t] += wgt * ((gate / (1 + np.exp(-gate)) * up) @ w2[g])
    aux = e * np.sum(counts / counts.sum() * probs.mean(0))
    return y.reshape(x.shape), aux, counts


def moe_inputs(h=96):
    return jax.random.normal(jax.random.key(7), (2, 24, h))


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_matches_reference(device, top_k):
    x = moe_inputs()
    model = FP8MoE(num_experts=4, ffn=64, top_k=top_k)
    params = jax.jit(model.init)(jax.random.key(0), x)
    p = params["params"]
    assert shapes_dtypes(p) == {"router_kernel": ((96, 4), jnp.dtype(jnp.float32)),
                                "w1": ((4, 96, 128), jnp.dtype(jnp.float32)),
                                "w2": ((4, 64, 96), jnp.dtype(jnp.float32))}
    (y, aux), state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(params, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref, ref_aux, counts = moe_reference(x, p["router_kernel"], p["w1"], p["w2"], top_k)
    assert calc_diff(y, ref) < 3e-3
    assert np.isfinite(float(aux)) and 0.9 <= float(aux) < 4
    np.testing.assert_allclose(float(aux), ref_aux, rtol=1e-4)
    np.testing.assert_array_equal(state["intermediates"]["aux_loss"][0], aux)

    # The NNX layer, given the same params, computes the same thing.
    layer = FP8MoELayer(96, 64, 4, top_k=top_k, rngs=nnx.Rngs(0))
    for name in ("router_kernel", "w1", "w2"):
        getattr(layer, name)[...] = p[name]
    y_nnx, aux_nnx = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_array_equal(y_nnx, y)
    np.testing.assert_array_equal(aux_nnx, aux)


def moe_grads(model, params, x):
    def loss(p):
        y, aux = model.apply(p, x)
        return jnp.mean(y.astype(jnp.float32) ** 2) + 0.01 * aux

    return jax.jit(jax.grad(loss))(params)["params"]


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_gradients_flow(device, top_k):
    x = moe_inputs()
    model = FP8MoE(num_experts=4, ffn=64, top_k=top_k)
    params = jax.jit(model.init)(jax.random.key(0), x)
    grads = moe_grads(model, params, x)
    for name in ("router_kernel", "w1", "w2"):
        g = np.asarray(grads[name])
        assert np.isfinite(g).all(), name
        assert np.abs(g).max() > 0, name
    # Every expert got tokens, so every expert's weights get a gradient.
    assert (np.abs(np.asarray(grads["w1"])).reshape(4, -1).max(1) > 0).all()


def test_moe_empty_expert(device):
    """An expert that no token picks: its rows are empty, the rest is unaffected."""
    x = moe_inputs()
    x = x.at[..., 0].set(1.0)  # a constant feature lets the router shut expert 3 out
    model = FP8MoE(num_experts=4, ffn=64, top_k=2)
    params = jax.jit(model.init)(jax.random.key(0), x)
    router = params["params"]["router_kernel"].at[:, 3].set(0.0).at[0, 3].set(-100.0)
    params = {"params": {**params["params"], "router_kernel": router}}
    y, aux = jax.jit(model.apply)(params, x)
    p = params["params"]
    ref, ref_aux, counts = moe_reference(x, p["router_kernel"], p["w1"], p["w2"], 2)
    assert counts[3] == 0 and (counts[:3] > 0).all()
    assert np.isfinite(np.asarray(y)).all()
    assert calc_diff(y, ref) < 3e-3
    np.testing.assert_allclose(float(aux), ref_aux, rtol=1e-4)

    grads = moe_grads(model, params, x)
    for name in ("router_kernel", "w1", "w2"):
        assert np.isfinite(np.asarray(grads[name])).all(), name
    for name in ("w1", "w2"):
        g = np.asarray(grads[name])
        assert not g[3].any(), name            # the empty expert: no gradient
        assert (np.abs(g[:3]).reshape(3, -1).max(1) > 0).all(), name


def test_moe_layer_trains_in_nnx():
    x = moe_inputs(64)
    target = jnp.tanh(x[..., ::-1])
    layer = FP8MoELayer(64, 32, 4, top_k=2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer):
        def loss_fn(m):
            y, aux = m(x)
            return jnp.mean((y - target) ** 2) + 0.01 * aux
        loss, grads = nnx.value_and_grad(loss_fn)(layer)
        optimizer.update(layer, grads)
        return loss

    losses = [float(step(layer, optimizer)) for _ in range(15)]
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
