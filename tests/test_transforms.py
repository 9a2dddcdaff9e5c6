"""jit, vmap and grad of the public ops.

The kernels are deterministic (every output element summed in a fixed order), and the
batching rules only regroup whole problems, so a jitted or vmapped result must equal the
eager, python-loop one bit for bit."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_fp8gemm as fg
from jax_fp8gemm import Recipe
from helpers import calc_diff, on, on_tensor_cores, randn

FP8_TYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def assert_identical(got, expected):
    """Pytrees of arrays with the same shapes, dtypes and bits.

    On Hopper a vmapped batched weight runs the grouped kernel while the loop runs the dense
    one, and until both share the wgmma mainloop their sums may differ in the last bits:
    there the check is the tensor cores' rounding bound instead."""
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected)
    assert got_tree == exp_tree
    for g, e in zip(got_leaves, exp_leaves):
        tensor_cores = on_tensor_cores(g) and jnp.issubdtype(g.dtype, jnp.floating) \
            and np.dtype(g.dtype) not in FP8_TYPES
        g, e = np.asarray(g), np.asarray(e)
        if tensor_cores:
            assert g.dtype == e.dtype and g.shape == e.shape
            g64, e64 = g.astype(np.float64), e.astype(np.float64)
            # Each kernel is checked against the float64 product elsewhere; here the two
            # only have to agree to a few tensor-core roundings of the largest output.
            tol = 2.0 ** -7 if g.dtype == jnp.bfloat16 else 2.0 ** -9
            np.testing.assert_allclose(g64, e64, rtol=0, atol=tol * max(np.abs(e64).max(), 1e-30))
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, g.shape, e.dtype, e.shape)
        if g.dtype in FP8_TYPES:
            g, e = g.view(np.uint8), e.view(np.uint8)
        np.testing.assert_array_equal(g, e)


def stack(results):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *results)


def loop(fn, in_axes, *args):
    """What vmap(fn, in_axes)(*args) must equal: fn per batch entry, stacked."""
    size = next(np.shape(a)[ax] for a, ax in zip(args, in_axes) if ax is not None)
    take = lambda a, ax, i: a if ax is None else jnp.take(a, i, axis=ax)
    return stack([fn(*(take(a, ax, i) for a, ax in zip(args, in_axes))) for i in range(size)])


def check_vmap(fn, in_axes, *args):
    got = jax.vmap(fn, in_axes=in_axes)(*args)
    assert_identical(got, loop(fn, in_axes, *args))
    return got


K, N = 320, 200


def per_example(quantize, x, axis=0):
    """Quantizes each entry of x along `axis` on its own: (q stacked on axis, scales [V, ...])."""
    pairs = [quantize(jnp.take(x, i, axis=axis)) for i in range(x.shape[axis])]
    return (jnp.stack([p[0] for p in pairs], axis=axis), jnp.stack([p[1] for p in pairs]))


# ---------------------------------------------------------------------------------------
# jit of every public op equals the eager call.

def _jit_case(name, rng):
    """(fn, args) for one public op."""
    x = randn(rng, (40, K))
    w = randn(rng, (K, N))
    if name.startswith("quantize") or name == "compute_scales":
        fn = {
            "quantize_fp8": lambda v: fg.quantize_fp8(v, "e5m2"),
            "quantize_fp8_fine_grained": lambda v: fg.quantize_fp8_fine_grained(v, 64),
            "quantize_fp8_fine_grained-bsxbs-transpose": lambda v: fg.quantize_fp8_fine_grained(
                v, 128, block_shape=(128, 128), transpose=True),
            "compute_scales": lambda v: fg.compute_scales(v, 256, "e5m2"),
        }[name]
        return fn, (x,)
    qa, sa = fg.quantize_fp8_fine_grained(x)
    qb, sb = fg.quantize_fp8_fine_grained(w, block_shape=(128, 128))
    if name == "dequantize":
        return (lambda q, s: fg.dequantize(q, s, 128)), (qb, sb)
    if name == "fp8_gemm":
        (qx, sx), (qw, sw) = fg.quantize_fp8(x), fg.quantize_fp8(w)
        return (lambda *a: fg.fp8_gemm(*a, out_dtype=jnp.float32)), (qx, qw, sx, sw)
    if name == "fp8_gemm_fine_grained":
        return fg.fp8_gemm_fine_grained, (qa, qb, sa, sb)
    if name == "fp8_gemm_fine_grained-row-acc":
        qbr, sbr = fg.quantize_fp8_fine_grained(w, transpose=True)
        fn = lambda a, b, s, t, c: fg.fp8_gemm_fine_grained(
            a, b, s, t, out_dtype=jnp.float32, b_layout="nk", b_scaling="row", accumulator=c)
        return fn, (qa, qbr, sa, sbr, randn(rng, (40, N)))
    we = randn(rng, (3, K, N))
    sizes = np.asarray([10, 0, 25], np.int32)
    qwe, swe = fg.quantize_fp8_fine_grained(we, block_shape=(128, 128))
    if name == "grouped_gemm":
        return (lambda *a: fg.grouped_gemm(*a)), (qa, qwe, sa, swe, sizes)
    if name == "grouped_gemm-list":
        return (lambda xs, ws, sxs, sws: fg.grouped_gemm(xs, ws, sxs, sws)), (
            [qa[:10], qa[10:]], [qwe[0], qwe[1]], [sa[:10], sa[10:]], [swe[0], swe[1]])
    if name == "grouped_gemm_masked":
        qxm, sxm = fg.quantize_fp8_fine_grained(randn(rng, (3, 16, K)))
        return fg.grouped_gemm_masked, (qxm, np.asarray([16, 3, 0], np.int32), qwe, sxm, swe)
    w1, w2 = randn(rng, (3, K, 2 * 64), scale=0.05), randn(rng, (3, 64, K), scale=0.1)
    if name == "grouped_gemm_moe":
        return fg.grouped_gemm_moe, (x, sizes, w1, w2)
    if name == "grouped_gemm_moe-bf16":
        return (lambda *a: fg.grouped_gemm_moe(*a, use_fp8=False)), (x, sizes, w1, w2)
    if name == "fp8_matmul":
        return fg.fp8_matmul, (x, w)
    assert name == "fp8_grouped_matmul"
    return fg.fp8_grouped_matmul, (x, sizes, we)


JIT_CASES = [
    "quantize_fp8", "quantize_fp8_fine_grained", "quantize_fp8_fine_grained-bsxbs-transpose",
    "compute_scales", "dequantize", "fp8_gemm", "fp8_gemm_fine_grained",
    "fp8_gemm_fine_grained-row-acc", "grouped_gemm", "grouped_gemm-list", "grouped_gemm_masked",
    "grouped_gemm_moe", "grouped_gemm_moe-bf16", "fp8_matmul", "fp8_grouped_matmul",
]


@pytest.mark.parametrize("name", JIT_CASES)
def test_jit_equals_eager(device, rng, name):
    fn, args = _jit_case(name, rng)
    args = jax.tree_util.tree_map(lambda a: on(device, a), args)
    assert_identical(jax.jit(fn)(*args), fn(*args))


# ---------------------------------------------------------------------------------------
# vmap of the dense GEMMs.

V, M = 3, 20


@pytest.mark.parametrize("in_axes", [
    (0, None, None, None),  # batched a, shared b, one scale for all of a
    (0, None, 0, None),     # batched a with a scale per example
    (None, 0, None, 0),     # shared a, batched b
    (0, 0, 0, 0),           # both batched
], ids=["a", "a-scale_a", "b", "a-b"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_vmap_fp8_gemm(device, rng, in_axes, layout):
    bshape = (K, N) if layout == "kn" else (N, K)
    a = on(device, randn(rng, (V, M, K)))
    b = on(device, randn(rng, (V,) + bshape))
    if in_axes[2] == 0:
        qa, sa = per_example(fg.quantize_fp8, a)
    else:
        qa, sa = fg.quantize_fp8(a)  # one scale shared by the batch
    qb, sb = per_example(fg.quantize_fp8, b)
    if in_axes[0] is None:
        qa, sa = qa[0], sa if np.ndim(sa) == 0 else sa[0]
    if in_axes[1] is None:
        qb, sb = qb[0], sb[0]
    fn = lambda *args: fg.fp8_gemm(*args, out_dtype=jnp.float32, b_layout=layout)
    out = check_vmap(fn, in_axes, qa, qb, sa, sb)
    assert out.shape == (V, M, N)


@pytest.mark.parametrize("which", ["a", "b"])
def test_vmap_fp8_gemm_batch_axis_not_first(device, rng, which):
    if which == "a":
        qa, sa = fg.quantize_fp8(on(device, randn(rng, (M, V, K))))  # batch on axis 1
        qb, sb = fg.quantize_fp8(on(device, randn(rng, (K, N))))
        in_axes = (1, None, None, None)
    else:
        qa, sa = fg.quantize_fp8(on(device, randn(rng, (M, K))))
        qb, sb = per_example(fg.quantize_fp8, on(device, randn(rng, (K, V, N))), axis=1)
        in_axes = (None, 1, None, 0)
    out = check_vmap(lambda *args: fg.fp8_gemm(*args), in_axes, qa, qb, sa, sb)
    assert out.shape == (V, M, N)


def _fine_inputs(device, rng, b_scaling, layout, batched_b):
    a = on(device, randn(rng, (V, M, K)))
    qa, sa = fg.quantize_fp8_fine_grained(a)  # row scales: per example by construction
    b = on(device, randn(rng, ((V,) if batched_b else ()) + (K, N)))
    if b_scaling == "block":
        qb, sb = fg.quantize_fp8_fine_grained(b, block_shape=(128, 128))  # [.., K, N]
        if layout == "nk":
            qb, sb = jnp.swapaxes(qb, -1, -2), jnp.swapaxes(sb, -1, -2)
    else:
        qb, sb = fg.quantize_fp8_fine_grained(b, transpose=True)  # [.., N, K], [.., N, kb]
        if layout == "kn":
            qb, sb = jnp.swapaxes(qb, -1, -2), jnp.swapaxes(sb, -1, -2)
    return qa, sa, qb, sb


@pytest.mark.parametrize("accumulate", [False, True], ids=["no-acc", "acc"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("b_scaling", ["block", "row"])
@pytest.mark.parametrize("batched", ["a", "b", "a-b"])
def test_vmap_fp8_gemm_fine_grained(device, rng, batched, b_scaling, layout, accumulate):
    """A batched b becomes one masked grouped call (block scales) or one k-grouped call
    (row scales); a batched a alone folds into M."""
    qa, sa, qb, sb = _fine_inputs(device, rng, b_scaling, layout, batched_b="b" in batched)
    if "a" not in batched:
        qa, sa = qa[0], sa[0]
    acc = on(device, randn(rng, (V, M, N), scale=10.0))
    a_ax = 0 if "a" in batched else None
    b_ax = 0 if "b" in batched else None
    out_dtype = jnp.float32 if accumulate else jnp.bfloat16

    def fn(a, b, s, t, c):
        return fg.fp8_gemm_fine_grained(a, b, s, t, out_dtype=out_dtype, b_layout=layout,
                                        b_scaling=b_scaling, accumulator=c if accumulate else None)

    out = check_vmap(fn, (a_ax, b_ax, a_ax, b_ax, 0), qa, qb, sa, sb, acc)
    assert out.shape == (V, M, N) and out.dtype == out_dtype
    if batched != "a":
        text = jax.jit(jax.vmap(fn, in_axes=(a_ax, b_ax, a_ax, b_ax, 0))).lower(
            qa, qb, sa, sb, acc).as_text()
        kernel = "grouped_kgrouped" if b_scaling == "row" else "grouped_masked"
        assert f"jax_fp8gemm_{kernel}_v1" in text


def test_vmap_fp8_gemm_fine_grained_nested(device, rng):
    qa, sa = fg.quantize_fp8_fine_grained(on(device, randn(rng, (2, V, M, K))))
    qb, sb = fg.quantize_fp8_fine_grained(on(device, randn(rng, (2, K, N))), block_shape=(128, 128))
    inner = jax.vmap(fg.fp8_gemm_fine_grained, in_axes=(0, None, 0, None))
    got = jax.vmap(inner, in_axes=(0, 0, 0, 0))(qa, qb, sa, sb)
    expected = stack([stack([fg.fp8_gemm_fine_grained(qa[i, j], qb[i], sa[i, j], sb[i])
                             for j in range(V)]) for i in range(2)])
    assert_identical(got, expected)


# ---------------------------------------------------------------------------------------
# vmap of quantization.

@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_vmap_quantize_fp8_per_example_scales(device, rng, fmt, axis):
    x = randn(rng, (V, 50, 130)) * np.asarray([1.0, 100.0, 0.01], np.float32)[:, None, None]
    x = on(device, np.moveaxis(x, 0, axis))
    q, s = check_vmap(lambda v: fg.quantize_fp8(v, fmt), (axis,), x)
    assert s.shape == (V,)
    assert len(set(np.asarray(s).tolist())) == V  # one scale per example, not one for all


@pytest.mark.parametrize("variant", ["1xbs", "bsxbs", "1xbs-transpose", "bsxbs-transpose"])
@pytest.mark.parametrize("axis", [0, 2])
def test_vmap_quantize_fp8_fine_grained(device, rng, variant, axis):
    x = on(device, np.moveaxis(randn(rng, (V, 130, 200)), 0, axis))
    shape = (64, 64) if variant.startswith("bsxbs") else None
    fn = lambda v: fg.quantize_fp8_fine_grained(v, 64, block_shape=shape,
                                                transpose=variant.endswith("transpose"))
    check_vmap(fn, (axis,), x)
    check_vmap(lambda v: fg.compute_scales(v, 64, block_shape=shape), (axis,), x)


def test_vmap_dequantize(device, rng):
    q, s = fg.quantize_fp8_fine_grained(on(device, randn(rng, (V, 130, 200))), 64)
    check_vmap(lambda a, b: fg.dequantize(a, b, 64), (0, 0), q, s)


# ---------------------------------------------------------------------------------------
# vmap of the grouped GEMMs.

def _grouped_inputs(device, rng, scaling, batched_w):
    x = on(device, randn(rng, (V, 60, K)))
    w = on(device, randn(rng, ((V,) if batched_w else ()) + (4, K, N)))
    sizes = on(device, np.asarray([[10, 0, 25, 5], [0, 0, 60, 0], [30, 1, -4, 20]], np.int32))
    if scaling == "tensor":
        qx, sx = per_example(fg.quantize_fp8, x)
        if batched_w:
            qw, sw = per_example(lambda v: per_example(fg.quantize_fp8, v), w)
        else:
            qw, sw = per_example(fg.quantize_fp8, w)
    else:
        qx, sx = fg.quantize_fp8_fine_grained(x)
        qw, sw = fg.quantize_fp8_fine_grained(w, block_shape=(128, 128))
    return qx, sx, qw, sw, sizes


@pytest.mark.parametrize("scaling", ["tensor", "block"])
@pytest.mark.parametrize("batched_w", [False, True], ids=["shared-w", "batched-w"])
def test_vmap_grouped_gemm(device, rng, scaling, batched_w):
    qx, sx, qw, sw, sizes = _grouped_inputs(device, rng, scaling, batched_w)
    w_ax = 0 if batched_w else None
    fn = lambda x, w, s, t, g: fg.grouped_gemm(x, w, s, t, g)
    out = check_vmap(fn, (0, w_ax, 0, w_ax, 0), qx, qw, sx, sw, sizes)
    assert out.shape == (V, 60, N)
    assert (np.asarray(out[2], np.float32)[51:] == 0).all()  # past its sum (negative size: 0)


def test_vmap_grouped_gemm_shared_sizes_batched_w(device, rng):
    qx, sx, qw, sw, sizes = _grouped_inputs(device, rng, "block", True)
    fn = lambda w, t: fg.grouped_gemm(qx[0], w, sx[0], t, sizes[0], w_layout="kn")
    check_vmap(fn, (0, 0), qw, sw)


@pytest.mark.parametrize("scaling", ["tensor", "block"])
@pytest.mark.parametrize("batched_w", [False, True], ids=["shared-w", "batched-w"])
def test_vmap_grouped_gemm_masked(device, rng, scaling, batched_w):
    x = on(device, randn(rng, (V, 4, 24, K)))
    w = on(device, randn(rng, ((V,) if batched_w else ()) + (4, N, K)))
    masked = on(device, np.asarray([[24, 0, 3, 30], [1, 2, 3, 4], [0, 0, 0, 24]], np.int32))
    if scaling == "tensor":
        qx, sx = per_example(fg.quantize_fp8, x)
        quant_w = lambda v: per_example(fg.quantize_fp8, v)
        qw, sw = per_example(quant_w, w) if batched_w else quant_w(w)
    else:
        qx, sx = fg.quantize_fp8_fine_grained(x)
        qw, sw = fg.quantize_fp8_fine_grained(w, block_shape=(128, 128))
    w_ax = 0 if batched_w else None
    fn = lambda x, m, w, s, t: fg.grouped_gemm_masked(x, m, w, s, t, w_layout="nk")
    out = check_vmap(fn, (0, 0, w_ax, 0, w_ax), qx, masked, qw, sx, sw)
    assert (np.asarray(out[0, 2], np.float32)[3:] == 0).all()


# ---------------------------------------------------------------------------------------
# Gradients.

# dx = Q(dy) @ Q(w)^T and dw = Q(x^T) @ Q(dy^T)^T each multiply two FP8-rounded operands:
# their rounding errors compound, calc_diff ~6.5e-4 for e4m3 x e4m3 and ~1.6e-3 when dy is
# e5m2 (one mantissa bit less); measured over 12 seeds: at most 7.3e-4 and 1.6e-3. The
# forward pass rounds two operands once: < 1e-3 as for fp8_gemm. BF16 backward: ~3e-6.
GRAD_DIFF = 3e-3
FWD_DIFF = 1e-3

RECIPES = {
    "default": None,
    "per_tensor": Recipe(scaling="per_tensor"),
    "bf16-backward": Recipe(backward="bf16"),
    "block64": Recipe(block_size=64),
    "e5m2-backward": Recipe(bwd_dtype="e5m2"),
}


def matmul_f32(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def f32_grads(f, args, cotangent):
    y, pull = jax.vjp(f, *args)
    return y, pull(cotangent)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fp8_matmul_grads(device, rng, recipe):
    x = randn(rng, (3, 50, K))  # 150 tokens: a partial 128-block along the token axis
    w = randn(rng, (K, N), scale=K ** -0.5)
    dy = randn(rng, (3, 50, N))
    y, (dx, dw) = f32_grads(lambda a, b: fg.fp8_matmul(a, b, RECIPES[recipe]),
                            on(device, x, w), on(device, dy))
    y_ref, (dx_ref, dw_ref) = f32_grads(matmul_f32, (x, w), dy)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    assert y.shape == y_ref.shape and dx.shape == x.shape and dw.shape == w.shape
    assert calc_diff(y, y_ref) < FWD_DIFF
    assert calc_diff(dx, dx_ref) < GRAD_DIFF
    assert calc_diff(dw, dw_ref) < GRAD_DIFF
    if recipe == "bf16-backward":
        assert calc_diff(dx, dx_ref) < 1e-4 and calc_diff(dw, dw_ref) < 1e-4


def test_fp8_matmul_grads_keep_input_dtypes(device, rng):
    x = randn(rng, (64, K), dtype=ml_dtypes.bfloat16)
    w = randn(rng, (K, N), scale=K ** -0.5)
    dy = randn(rng, (64, N), dtype=ml_dtypes.bfloat16)
    y, (dx, dw) = f32_grads(fg.fp8_matmul, on(device, x, w), on(device, dy))
    assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    _, (dx_ref, dw_ref) = f32_grads(matmul_f32, (x32, w), dy32)
    assert calc_diff(dx, dx_ref) < GRAD_DIFF
    assert calc_diff(dw, dw_ref) < GRAD_DIFF


GROUP_SIZES = np.asarray([30, 0, 45, 1, 20], np.int32)  # sum 96 of 110 rows


@pytest.mark.parametrize("recipe", ["default", "per_tensor", "bf16-backward"])
def test_fp8_grouped_matmul_grads(device, rng, recipe):
    m, groups = 110, len(GROUP_SIZES)
    x = randn(rng, (m, K))
    w = randn(rng, (groups, K, N), scale=K ** -0.5)
    dy = randn(rng, (m, N))
    f = lambda a, b: fg.fp8_grouped_matmul(a, on(device, GROUP_SIZES), b, RECIPES[recipe])
    y, (dx, dw) = f32_grads(f, on(device, x, w), on(device, dy))
    ragged = lambda a, b: jax.lax.ragged_dot(a, b, GROUP_SIZES,
                                             precision=jax.lax.Precision.HIGHEST)
    y_ref, (dx_ref, dw_ref) = f32_grads(ragged, (x, w), dy)
    total = GROUP_SIZES.sum()
    assert (np.asarray(dx_ref)[total:] == 0).all()  # the reference's own convention
    assert (np.asarray(y)[total:] == 0).all()
    assert (np.asarray(dx)[total:] == 0).all()  # rows past the sum get no gradient
    assert (np.asarray(dw)[1] == 0).all()       # nor does the empty group's weight
    assert calc_diff(y, y_ref) < FWD_DIFF
    assert calc_diff(dx, dx_ref) < GRAD_DIFF
    assert calc_diff(dw, dw_ref) < GRAD_DIFF
    # The one-row group too (calc_diff over everything would hide it).
    assert calc_diff(np.asarray(dw)[3], np.asarray(dw_ref)[3]) < GRAD_DIFF


def _loss(recipe=None):
    return lambda x, w, c: jnp.sum(fg.fp8_matmul(x, w, recipe) * c)


def test_grad_under_jit(device, rng):
    x, w, c = on(device, randn(rng, (70, K)), randn(rng, (K, N), scale=0.05), randn(rng, (70, N)))
    grad = jax.grad(_loss(), argnums=(0, 1))
    assert_identical(jax.jit(grad)(x, w, c), grad(x, w, c))


def test_vmap_of_grad(device, rng):
    """Per-example gradients: x and the cotangent batched, w shared."""
    x = on(device, randn(rng, (V, 40, K)))
    w = on(device, randn(rng, (K, N), scale=0.05))
    c = on(device, randn(rng, (V, 40, N)))
    grad = jax.grad(_loss(), argnums=(0, 1))
    got = check_vmap(grad, (0, None, 0), x, w, c)
    assert got[1].shape == (V, K, N)
    assert_identical(jax.jit(jax.vmap(grad, in_axes=(0, None, 0)))(x, w, c), got)


def test_grad_lowers_to_the_ffi_kernels(device, rng):
    """The backward pass runs the library's custom calls, not some XLA fallback."""
    x, w, c = on(device, randn(rng, (70, K)), randn(rng, (K, N)), randn(rng, (70, N)))
    text = jax.jit(jax.grad(_loss(), argnums=(0, 1))).lower(x, w, c).as_text()
    assert "jax_fp8gemm_gemm_v1" in text
    assert "jax_fp8gemm_quantize_block_v1" in text
    # With the loss value too: forward and dgrad (1D2D scales) and wgrad (1D1D) GEMMs.
    text = jax.jit(jax.value_and_grad(_loss(), argnums=(0, 1))).lower(x, w, c).as_text()
    gemms = [line for line in text.splitlines() if "@jax_fp8gemm_gemm_v1(" in line]
    assert len(gemms) == 3
    assert sum("scale_mode = 1 " in line for line in gemms) == 2
    assert sum("scale_mode = 2 " in line for line in gemms) == 1

    sizes = on(device, GROUP_SIZES)
    we = on(device, randn(rng, (len(GROUP_SIZES), K, N)))
    loss = lambda a, b: jnp.sum(fg.fp8_grouped_matmul(a, sizes, b) ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        on(device, randn(rng, (110, K))), we).as_text()
    assert "jax_fp8gemm_grouped_contiguous_v1" in text
    assert "jax_fp8gemm_grouped_kgrouped_v1" in text
