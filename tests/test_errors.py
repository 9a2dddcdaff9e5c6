"""Bad input fails at trace time with a message naming the argument, what it got and what
was expected. Calls go through jax.eval_shape on abstract arrays, so nothing runs: the
error must come from the Python checks or the primitives' abstract evaluation. The last
section bypasses both and checks the C++ validation of each FFI handler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fp8gemm as fg
from jax_fp8gemm import Recipe
from jax_fp8gemm.primitives import gemm as gemm_prim
from jax_fp8gemm.primitives import grouped as grouped_prim
from jax_fp8gemm.primitives import quantize as quantize_prim

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
F32, BF16 = jnp.float32, jnp.bfloat16
I32 = jnp.int32


def spec(shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def fails(exc, match, fn, *args):
    with pytest.raises(exc, match=match):
        jax.eval_shape(fn, *args)


# Valid operands of a [8, 256] @ [256, 200] GEMM, to break one at a time.
A, SA_ROWS = spec((8, 256), E4M3), spec((8, 2))
B_KN, B_NK = spec((256, 200), E4M3), spec((200, 256), E4M3)
SB_BLOCK_KN, SB_ROW_KN = spec((2, 2)), spec((2, 200))
SCALAR = spec(())


def test_valid_operands_trace():
    """The baseline the other tests break: these trace fine."""
    assert jax.eval_shape(fg.fp8_gemm, A, B_KN, SCALAR, SCALAR).shape == (8, 200)
    assert jax.eval_shape(fg.fp8_gemm_fine_grained, A, B_KN, SA_ROWS, SB_BLOCK_KN).shape == (8, 200)
    out = jax.eval_shape(lambda *a: fg.fp8_gemm_fine_grained(*a, b_scaling="row"),
                         A, B_KN, SA_ROWS, SB_ROW_KN)
    assert out.shape == (8, 200)


# ---------------------------------------------------------------------------------------
# Dense GEMMs.

@pytest.mark.parametrize("gemm", ["tensor", "fine"])
def test_float_operands_rejected(gemm):
    scales = (SCALAR, SCALAR) if gemm == "tensor" else (SA_ROWS, SB_BLOCK_KN)
    fn = fg.fp8_gemm if gemm == "tensor" else fg.fp8_gemm_fine_grained
    fails(TypeError, r"^a must be float8_e4m3fn or float8_e5m2 .*got float32", fn,
          spec((8, 256)), B_KN, *scales)
    fails(TypeError, r"^b must be float8_e4m3fn or float8_e5m2 .*got bfloat16", fn,
          A, spec((256, 200), BF16), *scales)


@pytest.mark.parametrize("layout, b, expected", [
    ("kn", spec((128, 200), E4M3), r"b has shape \(128, 200\), expected \(K, N\) with K = 256"),
    ("nk", spec((256, 200), E4M3), r"b has shape \(256, 200\), expected \(N, K\) with K = 256"),
])
def test_mismatched_k(layout, b, expected):
    fails(ValueError, expected, lambda a, b: fg.fp8_gemm(a, b, 1.0, 1.0, b_layout=layout), A, b)
    fails(ValueError, expected,
          lambda a, b: fg.fp8_gemm_fine_grained(a, b, jnp.ones((8, 2)), jnp.ones((2, 2)),
                                                b_layout=layout), A, b)


def test_b_rank():
    fails(ValueError, r"b must have rank 2 .*got shape \(2, 256, 200\)",
          fg.fp8_gemm, A, spec((2, 256, 200), E4M3), SCALAR, SCALAR)


def test_per_tensor_scales_must_be_scalars():
    fails(ValueError, r"scale_a must be a per-tensor scalar, got shape \(8, 2\)",
          fg.fp8_gemm, A, B_KN, SA_ROWS, SCALAR)
    fails(ValueError, r"scale_b must be a per-tensor scalar, got shape \(2, 2\)",
          fg.fp8_gemm, A, B_KN, SCALAR, SB_BLOCK_KN)
    fails(TypeError, r"scale_b must be float32, got bfloat16",
          fg.fp8_gemm, A, B_KN, SCALAR, spec((), BF16))


@pytest.mark.parametrize("layout, b_scaling, scales_b, expected", [
    ("kn", "block", spec((2, 200)), r"scales_b has shape \(2, 200\), expected \(2, 2\) \(128 x 128 blocks"),
    ("nk", "block", spec((2, 2, 1)), r"scales_b has shape \(2, 2, 1\), expected \(2, 2\)"),
    ("kn", "row", spec((2, 2)), r"scales_b has shape \(2, 2\), expected \(2, 200\) \(1 x 128 blocks along K"),
    ("nk", "row", spec((2, 200)), r"scales_b has shape \(2, 200\), expected \(200, 2\)"),
])
def test_wrong_scales_b_shape(layout, b_scaling, scales_b, expected):
    b = B_KN if layout == "kn" else B_NK
    fails(ValueError, expected,
          lambda *a: fg.fp8_gemm_fine_grained(*a, b_layout=layout, b_scaling=b_scaling),
          A, b, SA_ROWS, scales_b)


@pytest.mark.parametrize("scales_a, expected", [
    (spec((8, 3)), r"scales_a has shape \(8, 3\), expected \(8, 2\) \(1 x 128 blocks of a along K\)"),
    (spec((2,)), r"scales_a has shape \(2,\), expected \(8, 2\)"),
    (spec(()), r"scales_a has shape \(\), expected \(8, 2\)"),
])
def test_wrong_scales_a_shape(scales_a, expected):
    fails(ValueError, expected, fg.fp8_gemm_fine_grained, A, B_KN, scales_a, SB_BLOCK_KN)


def test_scales_a_shape_follows_block_size():
    fails(ValueError, r"scales_a has shape \(8, 2\), expected \(8, 4\) \(1 x 64 blocks",
          lambda *a: fg.fp8_gemm_fine_grained(*a, block_size=64), A, B_KN, SA_ROWS,
          spec((4, 4)))


def test_scales_dtype():
    fails(TypeError, r"scales_a must be float32, got float16", fg.fp8_gemm_fine_grained,
          A, B_KN, spec((8, 2), jnp.float16), SB_BLOCK_KN)


@pytest.mark.parametrize("block_size", [100, 0, 32, 512, 128.0, True, "128", None])
def test_unsupported_block_sizes(block_size):
    match = r"block_size must be one of \(64, 128, 256\)"
    fails(ValueError, match, lambda *a: fg.fp8_gemm_fine_grained(*a, block_size=block_size),
          A, B_KN, SA_ROWS, SB_BLOCK_KN)
    fails(ValueError, match, lambda x: fg.quantize_fp8_fine_grained(x, block_size), spec((8, 256)))
    fails(ValueError, match, lambda x: fg.compute_scales(x, block_size), spec((8, 256)))
    fails(ValueError, match, lambda x: fg.quantize_fp8_with_transpose(x, block_size),
          spec((8, 256)))


@pytest.mark.parametrize("out_dtype", [jnp.float16, jnp.float64, jnp.int32, E4M3, "float", None])
def test_out_dtype_rejected(out_dtype):
    match = r"out_dtype must be jnp.bfloat16 or jnp.float32"
    fails(ValueError, match, lambda *a: fg.fp8_gemm(*a, out_dtype=out_dtype),
          A, B_KN, SCALAR, SCALAR)
    fails(ValueError, match, lambda *a: fg.fp8_gemm_fine_grained(*a, out_dtype=out_dtype),
          A, B_KN, SA_ROWS, SB_BLOCK_KN)
    fails(ValueError, match, lambda *a: fg.grouped_gemm(*a, out_dtype=out_dtype),
          spec((8, 256), E4M3), spec((3, 256, 200), E4M3), SCALAR, spec((3,)), spec((3,), I32))


@pytest.mark.parametrize("b_layout", ["KN", "nk ", "mk", "", None])
def test_bad_b_layout(b_layout):
    fails(ValueError, r"b_layout must be 'kn' \(\[K, N\]\) or 'nk' \(\[N, K\]\)",
          lambda *a: fg.fp8_gemm(*a, b_layout=b_layout), A, B_KN, SCALAR, SCALAR)


@pytest.mark.parametrize("b_scaling", ["tensor", "column", "1D2D", None])
def test_bad_b_scaling(b_scaling):
    fails(ValueError, r"b_scaling must be 'block' \(bs x bs\) or 'row' \(1 x bs\)",
          lambda *a: fg.fp8_gemm_fine_grained(*a, b_scaling=b_scaling),
          A, B_KN, SA_ROWS, SB_BLOCK_KN)


def test_accumulator_checks():
    fine = lambda out_dtype: (lambda a, b, s, t, c: fg.fp8_gemm_fine_grained(
        a, b, s, t, out_dtype=out_dtype, accumulator=c))
    fails(ValueError, r"accumulator needs out_dtype=jnp.float32",
          fine(BF16), A, B_KN, SA_ROWS, SB_BLOCK_KN, spec((8, 200)))
    fails(ValueError, r"accumulator has shape \(200, 8\), expected \(8, 200\)",
          fine(F32), A, B_KN, SA_ROWS, SB_BLOCK_KN, spec((200, 8)))
    fails(TypeError, r"accumulator must be float32, got bfloat16",
          fine(F32), A, B_KN, SA_ROWS, SB_BLOCK_KN, spec((8, 200), BF16))


# ---------------------------------------------------------------------------------------
# Quantization.

@pytest.mark.parametrize("block_shape, expected", [
    ((64, 128), r"block_shape must be \(1, b\) for activations or \(b, b\) for weights, got \(64, 128\)"),
    ((2, 2), r"block_shape\[1\] must be one of \(64, 128, 256\), got 2"),
    ((1, 100), r"block_shape\[1\] must be one of \(64, 128, 256\), got 100"),
    ((128,), r"block_shape must be a pair like \(1, 128\) or \(128, 128\), got \(128,\)"),
    ((1, 128, 128), r"block_shape must be a pair"),
    (128, r"block_shape must be a pair"),
    ("ab", r"block_shape must be a pair"),
])
def test_bad_block_shape(block_shape, expected):
    fails(ValueError, expected,
          lambda x: fg.quantize_fp8_fine_grained(x, block_shape=block_shape), spec((256, 256)))
    fails(ValueError, expected,
          lambda x: fg.compute_scales(x, block_shape=block_shape), spec((256, 256)))


@pytest.mark.parametrize("dtype", ["e4m3fn", "fp8", "E5M2", jnp.float16, jnp.float8_e4m3fnuz])
def test_bad_fp8_dtype(dtype):
    match = r"dtype must be 'e4m3', 'e5m2', jnp.float8_e4m3fn or jnp.float8_e5m2, got"
    fails(ValueError, match, lambda x: fg.quantize_fp8(x, dtype), spec((8, 256)))
    fails(ValueError, match, lambda x: fg.quantize_fp8_fine_grained(x, dtype=dtype), spec((8, 256)))
    fails(ValueError, match, lambda x: fg.quantize_fp8_with_transpose(x, dtype=dtype),
          spec((8, 256)))
    with pytest.raises(ValueError, match=match):
        Recipe(fwd_dtype=dtype)
    with pytest.raises(ValueError, match=match):
        fg.grouped_gemm_moe(jnp.ones((4, 64)), jnp.asarray([4]), jnp.ones((1, 64, 64)),
                            jnp.ones((1, 32, 64)), dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float8_e4m3fn, jnp.bool_])
def test_quantize_needs_float_input(dtype):
    match = rf"x must be float32, bfloat16 or float16, got {jnp.dtype(dtype).name}"
    fails(TypeError, match, fg.quantize_fp8, spec((8, 256), dtype))
    fails(TypeError, match, fg.quantize_fp8_fine_grained, spec((8, 256), dtype))
    fails(TypeError, match, fg.quantize_fp8_with_transpose, spec((8, 256), dtype))


def test_quantize_rank():
    fails(ValueError, r"x must have at least 1 dimension\(s\), got shape \(\)",
          fg.quantize_fp8_fine_grained, spec(()))
    fails(ValueError, r"x must have at least 2 dimension\(s\), got shape \(256,\)",
          lambda x: fg.quantize_fp8_fine_grained(x, block_shape=(128, 128)), spec((256,)))
    fails(ValueError, r"x must have at least 2 dimension\(s\), got shape \(256,\)",
          lambda x: fg.quantize_fp8_fine_grained(x, transpose=True), spec((256,)))
    fails(ValueError, r"x must have at least 2 dimensions, got shape \(256,\)",
          fg.quantize_fp8_with_transpose, spec((256,)))


def test_dequantize_checks():
    fails(TypeError, r"x_fp8 must be float8_e4m3fn or float8_e5m2 .*, got float32",
          fg.dequantize, spec((8, 256)), SA_ROWS)
    fails(TypeError, r"scales must be float32, got bfloat16",
          fg.dequantize, A, spec((8, 2), BF16))
    fails(ValueError, r"scales has shape \(8, 3\), which matches no block layout of x_fp8 "
                      r"\(8, 256\) with block_size 128: expected \(8, 2\) \(1 x 128\) or \(1, 2\)",
          fg.dequantize, A, spec((8, 3)))


# ---------------------------------------------------------------------------------------
# Grouped GEMMs.

G = 3
X = spec((50, 256), E4M3)
W_KN, W_NK = spec((G, 256, 200), E4M3), spec((G, 200, 256), E4M3)
SX_ROWS, SW_BLOCK_KN = spec((50, 2)), spec((G, 2, 2))
SIZES = spec((G,), I32)


def test_grouped_valid_operands_trace():
    assert jax.eval_shape(fg.grouped_gemm, X, W_KN, SCALAR, spec((G,)), SIZES).shape == (50, 200)
    assert jax.eval_shape(fg.grouped_gemm, X, W_KN, SX_ROWS, SW_BLOCK_KN, SIZES).shape == (50, 200)


@pytest.mark.parametrize("sizes_dtype", [jnp.float32, jnp.bfloat16, jnp.bool_])
def test_non_integer_group_sizes(sizes_dtype):
    bad = spec((G,), sizes_dtype)
    name = jnp.dtype(sizes_dtype).name
    fails(TypeError, rf"group_sizes must be an integer array, got {name}",
          fg.grouped_gemm, X, W_KN, SX_ROWS, SW_BLOCK_KN, bad)
    fails(TypeError, rf"masked_m must be an integer array, got {name}",
          fg.grouped_gemm_masked, spec((G, 16, 256), E4M3), bad, W_KN, SCALAR, spec((G,)))
    fails(TypeError, rf"group_sizes must be an integer array, got {name}",
          fg.grouped_gemm_moe, spec((50, 64)), bad, spec((G, 64, 64)), spec((G, 32, 64)))


@pytest.mark.parametrize("sizes_dtype", [jnp.float32, jnp.bfloat16, jnp.bool_])
def test_fp8_grouped_matmul_non_integer_group_sizes(sizes_dtype):
    # The same TypeError as grouped_gemm, grouped_gemm_masked and grouped_gemm_moe give.
    fails(TypeError, r"group_sizes must be an integer array",
          fg.fp8_grouped_matmul, spec((50, 64)), spec((G,), sizes_dtype), spec((G, 64, 32)))


@pytest.mark.parametrize("shape", [(G + 1,), (G - 1,), (1, G), ()])
def test_wrong_group_sizes_length(shape):
    expected = rf"group_sizes has shape {re_tuple(shape)}, expected \({G},\) \(one per group\)"
    fails(ValueError, expected, fg.grouped_gemm, X, W_KN, SX_ROWS, SW_BLOCK_KN, spec(shape, I32))
    fails(ValueError, rf"masked_m has shape {re_tuple(shape)}, expected \({G},\)",
          fg.grouped_gemm_masked, spec((G, 16, 256), E4M3), spec(shape, I32), W_KN, SCALAR,
          spec((G,)))
    fails(ValueError, rf"group_sizes has shape {re_tuple(shape)}, expected \({G},\)",
          fg.fp8_grouped_matmul, spec((50, 64)), spec(shape, I32), spec((G, 64, 32)))


def re_tuple(shape):
    return "\\(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + "\\)"


def test_group_sizes_required_for_arrays():
    fails(ValueError, r"group_sizes is required when x is an array",
          lambda *a: fg.grouped_gemm(*a), X, W_KN, SX_ROWS, SW_BLOCK_KN)


@pytest.mark.parametrize("w_layout", ["NK", "kn ", "gkn", None])
def test_bad_w_layout(w_layout):
    match = r"w_layout must be 'kn' \(\[G, K, N\]\) or 'nk' \(\[G, N, K\]\)"
    fails(ValueError, match, lambda *a: fg.grouped_gemm(*a, w_layout=w_layout),
          X, W_KN, SX_ROWS, SW_BLOCK_KN, SIZES)
    fails(ValueError, match, lambda *a: fg.grouped_gemm_masked(*a, w_layout=w_layout),
          spec((G, 16, 256), E4M3), SIZES, W_KN, SCALAR, spec((G,)))


@pytest.mark.parametrize("layout, scale_w, expected", [
    ("kn", spec((G, 2, 200)), r"scale_w has shape \(3, 2, 200\), expected \(3, 2, 2\) \(128 x 128 blocks of w, w_layout='kn'\)"),
    ("nk", spec((G, 3, 2)), r"scale_w has shape \(3, 3, 2\), expected \(3, 2, 2\)"),
    ("kn", spec((2,)), r"scale_w has shape \(2,\): expected \(3,\) or a scalar for per-tensor scaling"),
    ("kn", spec((G, 1)), r"scale_w has shape \(3, 1\): expected \(3,\) or a scalar"),
])
def test_wrong_scale_w_shape(layout, scale_w, expected):
    w = W_KN if layout == "kn" else W_NK
    sx = SX_ROWS if scale_w.ndim == 3 else SCALAR
    fails(ValueError, expected, lambda *a: fg.grouped_gemm(*a, w_layout=layout),
          X, w, sx, scale_w, SIZES)


@pytest.mark.parametrize("scale_x, scale_w, expected", [
    (spec((50, 3)), SW_BLOCK_KN, r"scale_x has shape \(50, 3\), expected \(50, 2\) \(1 x 128 blocks of x along K, since scale_w holds block scales\)"),
    (SCALAR, SW_BLOCK_KN, r"scale_x has shape \(\), expected \(50, 2\)"),
    (spec((5,)), spec((G,)), r"scale_x has shape \(5,\), expected a scalar or \(3,\) for per-tensor scaling"),
    (SX_ROWS, spec((G,)), r"scale_x has shape \(50, 2\), expected a scalar or \(3,\)"),
])
def test_wrong_scale_x_shape(scale_x, scale_w, expected):
    fails(ValueError, expected, fg.grouped_gemm, X, W_KN, scale_x, scale_w, SIZES)


def test_grouped_operand_checks():
    fails(TypeError, r"x must be float8_e4m3fn or float8_e5m2 .*, got float32",
          fg.grouped_gemm, spec((50, 256)), W_KN, SX_ROWS, SW_BLOCK_KN, SIZES)
    fails(TypeError, r"w must be float8_e4m3fn or float8_e5m2 .*, got bfloat16",
          fg.grouped_gemm, X, spec((G, 256, 200), BF16), SX_ROWS, SW_BLOCK_KN, SIZES)
    fails(ValueError, r"w has shape \(3, 128, 200\), expected \(3, 256, N\): K must match",
          fg.grouped_gemm, X, spec((G, 128, 200), E4M3), SX_ROWS, SW_BLOCK_KN, SIZES)
    fails(ValueError, r"w must have rank 3", fg.grouped_gemm, X, spec((256, 200), E4M3),
          SX_ROWS, SW_BLOCK_KN, SIZES)
    fails(ValueError, r"x must have shape \[M_total, K\], got \(2, 50, 256\)",
          fg.grouped_gemm, spec((2, 50, 256), E4M3), W_KN, SX_ROWS, SW_BLOCK_KN, SIZES)


def test_grouped_masked_checks():
    xm = spec((G, 16, 256), E4M3)
    fails(ValueError, r"w has 4 groups, but x has 3",
          fg.grouped_gemm_masked, xm, SIZES, spec((4, 256, 200), E4M3), SCALAR, spec((4,)))
    fails(ValueError, r"x must have shape \[G, M_max, K\], got \(16, 256\)",
          fg.grouped_gemm_masked, spec((16, 256), E4M3), SIZES, W_KN, SCALAR, spec((G,)))
    fails(ValueError, r"scale_x has shape \(3, 16, 3\), expected \(3, 16, 2\)",
          fg.grouped_gemm_masked, xm, SIZES, W_KN, spec((G, 16, 3)), SW_BLOCK_KN)


def test_list_form_checks():
    x, w = spec((5, 256), E4M3), spec((256, 200), E4M3)
    fails(ValueError, r"the list form needs one x, w, scale_x and scale_w per expert, got 2, 1, 2 and 2",
          lambda xs, ws, sxs, sws: fg.grouped_gemm(xs, ws, sxs, sws),
          [x, x], [w], [SCALAR, SCALAR], [SCALAR, SCALAR])
    fails(ValueError, r"group_sizes is implied by the list form",
          lambda xs, ws, sxs, sws: fg.grouped_gemm(xs, ws, sxs, sws, jnp.asarray([5])),
          [x], [w], [SCALAR], [SCALAR])
    fails(ValueError, r"x\[1\] has shape \(5, 128\), expected \(m_1, 256\)",
          lambda xs, ws, sxs, sws: fg.grouped_gemm(xs, ws, sxs, sws),
          [x, spec((5, 128), E4M3)], [w, w], [SCALAR, SCALAR], [SCALAR, SCALAR])


def test_moe_checks():
    x, w1, w2 = spec((50, 64)), spec((G, 64, 64)), spec((G, 32, 64))
    fails(ValueError, r"activation must be one of \['geglu', 'gelu', 'relu', 'silu', 'swiglu'\], got 'tanh'",
          lambda *a: fg.grouped_gemm_moe(*a, activation="tanh"), x, SIZES, w1, w2)
    fails(ValueError, r"inconsistent shapes x \(50, 64\), w1 \(3, 64, 64\), w2 \(3, 64, 64\): "
                      r"expected w1 \[G, 64, 2F\] and w2 \[G, F, 64\]",
          fg.grouped_gemm_moe, x, SIZES, w1, spec((G, 64, 64)))
    fails(ValueError, r"inconsistent shapes",
          lambda *a: fg.grouped_gemm_moe(*a, activation="gelu"), x, SIZES, w1, w2)
    fails(TypeError, r"w1 must be float32, bfloat16 or float16, got float8_e4m3fn",
          fg.grouped_gemm_moe, x, SIZES, spec((G, 64, 64), E4M3), w2)
    fails(ValueError, r"block_size must be one of", lambda *a: fg.grouped_gemm_moe(*a, block_size=96),
          x, SIZES, w1, w2)


# ---------------------------------------------------------------------------------------
# Differentiable matmuls and recipes.

def test_fp8_matmul_checks():
    fails(TypeError, r"x must be float32, bfloat16 or float16, got int32",
          fg.fp8_matmul, spec((8, 64), I32), spec((64, 32)))
    fails(TypeError, r"w must be float32, bfloat16 or float16, got float8_e4m3fn",
          fg.fp8_matmul, spec((8, 64)), spec((64, 32), E4M3))
    fails(ValueError, r"fp8_matmul needs x \[..., K\] and w \[K, N\], got \(8, 64\) and \(32, 64\)",
          fg.fp8_matmul, spec((8, 64)), spec((32, 64)))
    fails(ValueError, r"fp8_grouped_matmul needs x \[M, K\] and w \[G, K, N\], got \(8, 64\) and \(3, 32, 64\)",
          fg.fp8_grouped_matmul, spec((8, 64)), SIZES, spec((G, 32, 64)))


@pytest.mark.parametrize("kwargs, expected", [
    (dict(scaling="tensor"), r"scaling must be 'fine_grained' or 'per_tensor', got 'tensor'"),
    (dict(backward="fp16"), r"backward must be 'fp8' or 'bf16', got 'fp16'"),
    (dict(block_size=96), r"block_size must be one of \(64, 128, 256\), got 96"),
    (dict(bwd_dtype="e3m4"), r"dtype must be 'e4m3', 'e5m2'"),
])
def test_bad_recipe(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        Recipe(**kwargs)


# ---------------------------------------------------------------------------------------
# Straight to a primitive: abstract evaluation validates the canonical operands.

def test_gemm_primitive_abstract_eval():
    bind = lambda mode, block=128, out=BF16: (
        lambda *a: gemm_prim.gemm(*a, scale_mode=mode, block_size=block, out_dtype=out))
    b = spec((200, 256), E4M3)
    fails(ValueError, r"^scale_a has shape \(8, 3\), expected \(8, 2\) \(block scales, block 128\)",
          bind("block"), A, b, spec((8, 3)), spec((2, 2)))
    fails(ValueError, r"^scale_b has shape \(2, 2\), expected \(200, 2\) \(row scales, block 128\)",
          bind("row"), A, b, SA_ROWS, spec((2, 2)))
    fails(ValueError, r"^scale_a has shape \(\), expected \(1,\)", bind("tensor"), A, b, SCALAR,
          spec((1,)))
    fails(ValueError, r"^b has shape \(200, 128\), expected \(200, 256\) \(\[N, K\] with a's K = 256\)",
          bind("block"), A, spec((200, 128), E4M3), SA_ROWS, spec((2, 2)))
    fails(TypeError, r"^a must be float8_e4m3fn or float8_e5m2, got float32",
          bind("block"), spec((8, 256)), b, SA_ROWS, spec((2, 2)))
    fails(TypeError, r"^out_dtype must be bfloat16 or float32, got float16",
          bind("block", out=jnp.float16), A, b, SA_ROWS, spec((2, 2)))
    fails(ValueError, r"^accumulating into an existing array needs out_dtype float32",
          lambda *a: gemm_prim.gemm(*a, scale_mode="block", block_size=128, out_dtype=BF16),
          A, b, SA_ROWS, spec((2, 2)), spec((8, 200)))


def test_gemm_primitive_error_on_concrete_arrays(device):
    """Called eagerly, the same check fires before anything reaches the kernel."""
    a = jnp.zeros((8, 256), E4M3)
    b = jnp.zeros((200, 256), E4M3)
    with pytest.raises(ValueError, match=r"^scale_b has shape \(2, 3\), expected \(2, 2\)"):
        gemm_prim.gemm(a, b, jnp.ones((8, 2)), jnp.ones((2, 3)), scale_mode="block",
                       block_size=128, out_dtype=BF16)


def test_grouped_primitive_abstract_eval():
    x, w = spec((1, 50, 256), E4M3), spec((1, G, 200, 256), E4M3)
    sizes = spec((1, G), I32)
    bind = lambda prim: (lambda *a: prim(*a, scale_mode="block", block_size=128, out_dtype=BF16))
    fails(ValueError, r"^scale_w has shape \(1, 3, 2, 3\), expected \(1, 3, 2, 2\) \(128 x 128 blocks\)",
          bind(grouped_prim.grouped_contiguous), x, sizes, w, spec((1, 50, 2)), spec((1, G, 2, 3)))
    fails(TypeError, r"^group_sizes must be int32, got int16",
          bind(grouped_prim.grouped_contiguous), x, spec((1, G), jnp.int16), w, spec((1, 50, 2)),
          spec((1, G, 2, 2)))
    fails(ValueError, r"^w has batch 2, expected 1 or 1",
          bind(grouped_prim.grouped_contiguous), x, sizes, spec((2, G, 200, 256), E4M3),
          spec((1, 50, 2)), spec((2, G, 2, 2)))
    fails(ValueError, r"^w has 3 groups, but the group sizes have 4",
          bind(grouped_prim.grouped_masked), spec((1, 4, 16, 256), E4M3), spec((1, 4), I32), w,
          spec((1, 4, 16, 2)), spec((1, G, 2, 2)))
    fails(ValueError, r"^scale_b has shape \(1, 64, 2\), expected \(1, 64, 1\)",
          lambda *a: grouped_prim.grouped_kgrouped(*a, block_size=128),
          spec((1, 32, 100), E4M3), spec((1, 64, 100), E4M3), spec((1, G), I32),
          spec((1, 32, 1)), spec((1, 64, 2)))


def test_quantize_primitive_abstract_eval():
    fails(ValueError, r"^block shape must be \(1, b\) or \(b, b\) with b in \(64, 128, 256\), got \(64, 128\)",
          lambda x: quantize_prim.quantize_block(x, E4M3, 64, 128), spec((1, 256, 256)))
    fails(ValueError, r"^x must have rank 3 \(\[batch, rows, cols\]\), got shape \(256, 256\)",
          lambda x: quantize_prim.quantize_block(x, E4M3, 1, 128), spec((256, 256)))
    fails(TypeError, r"^x must be float32, bfloat16 or float16, got int32",
          lambda x: quantize_prim.quantize_tensor(x, E4M3), spec((1, 256), I32))


# ---------------------------------------------------------------------------------------
# Past abstract evaluation: the C++ decoders (csrc/common/ops.h) check every FFI call again,
# so a custom call with inconsistent operands fails with an error instead of reading or
# writing out of bounds.

def ffi(op, out, *args, **attrs):
    return jax.ffi.ffi_call(f"jax_fp8gemm_{op}_v1", out)(*args, **attrs)


def i64(v):
    return np.int64(v)


@pytest.mark.parametrize("case", ["scale_shape", "block_size", "scale_mode", "out_dtype", "acc_bf16"])
def test_ffi_gemm_validation(device, case):
    a = jnp.ones((8, 256), E4M3)
    b = jnp.ones((200, 256), E4M3)
    sa, sb = jnp.ones((8, 2)), jnp.ones((2, 2))
    out = jax.ShapeDtypeStruct((8, 200), BF16)
    attrs = dict(scale_mode=i64(1), block_size=i64(128))
    args = [a, b, sa, sb]
    expected = {
        "scale_shape": r"jax_fp8gemm: scale_a has shape \[8, 3\], expected \[8, 2\]",
        "block_size": r"jax_fp8gemm: block_size must be 64, 128 or 256, got 100",
        "scale_mode": r"jax_fp8gemm: unknown scale_mode 7",
        "out_dtype": r"jax_fp8gemm: out must be bfloat16 or float32",
        "acc_bf16": r"jax_fp8gemm: accumulating requires a float32 output",
    }[case]
    if case == "scale_shape":
        args[2] = jnp.ones((8, 3))
    elif case == "block_size":
        attrs["block_size"] = i64(100)
    elif case == "scale_mode":
        attrs["scale_mode"] = i64(7)
    elif case == "out_dtype":
        out = jax.ShapeDtypeStruct((8, 200), jnp.float16)
    else:
        args.append(jnp.ones((8, 200)))
    with pytest.raises(Exception, match=expected):
        jax.block_until_ready(jax.jit(lambda *v: ffi("gemm", out, *v, **attrs))(*args))


def test_ffi_grouped_validation(device):
    x = jnp.ones((1, 50, 256), E4M3)
    w = jnp.ones((1, G, 200, 256), E4M3)
    out = jax.ShapeDtypeStruct((1, 50, 200), BF16)
    attrs = dict(scale_mode=i64(1), block_size=i64(128))
    call = lambda *v: ffi("grouped_contiguous", out, *v, **attrs)
    with pytest.raises(Exception, match=r"jax_fp8gemm: group_sizes must be int32"):
        jax.block_until_ready(jax.jit(call)(x, jnp.ones((1, G), jnp.float32), w,
                                            jnp.ones((1, 50, 2)), jnp.ones((1, G, 2, 2))))
    with pytest.raises(Exception, match=r"jax_fp8gemm: scale_w has shape \[1, 3, 2, 1\], expected \[1, 3, 2, 2\]"):
        jax.block_until_ready(jax.jit(call)(x, jnp.ones((1, G), I32), w,
                                            jnp.ones((1, 50, 2)), jnp.ones((1, G, 2, 1))))


def test_ffi_quantize_validation(device):
    x = jnp.ones((1, 100, 300))
    outs = (jax.ShapeDtypeStruct((1, 100, 300), E4M3), jax.ShapeDtypeStruct((1, 100, 3), F32))
    call = lambda rows, cols, scales: ffi(
        "quantize_block", (outs[0], jax.ShapeDtypeStruct(scales, F32)), x,
        block_rows=i64(rows), block_cols=i64(cols), transpose=False)
    with pytest.raises(Exception, match=r"jax_fp8gemm: block_size must be 64, 128 or 256, got 100"):
        jax.block_until_ready(jax.jit(lambda: call(1, 100, (1, 100, 3)))())
    with pytest.raises(Exception, match=r"jax_fp8gemm: block_shape must be \(1, block_size\)"):
        jax.block_until_ready(jax.jit(lambda: call(64, 128, (1, 2, 3)))())
    with pytest.raises(Exception, match=r"jax_fp8gemm: scales has shape \[1, 100, 2\], expected \[1, 100, 3\]"):
        jax.block_until_ready(jax.jit(lambda: call(1, 128, (1, 100, 2)))())


def test_ffi_quantize_dual_validation(device):
    x = jnp.ones((1, 100, 300))

    def call(qt_dtype=E4M3, st_shape=(1, 300, 1)):
        outs = (jax.ShapeDtypeStruct((1, 100, 300), E4M3), jax.ShapeDtypeStruct((1, 100, 3), F32),
                jax.ShapeDtypeStruct((1, 300, 100), qt_dtype), jax.ShapeDtypeStruct(st_shape, F32))
        return ffi("quantize_dual", outs, x, block_size=i64(128))

    with pytest.raises(Exception, match=r"jax_fp8gemm: scales_t has shape \[1, 300, 2\], expected \[1, 300, 1\]"):
        jax.block_until_ready(jax.jit(lambda: call(st_shape=(1, 300, 2)))())
    with pytest.raises(Exception, match=r"jax_fp8gemm: x_fp8 and xt_fp8 must have the same FP8 dtype"):
        jax.block_until_ready(jax.jit(lambda: call(qt_dtype=jnp.float8_e5m2))())


# ---------------------------------------------------------------------------------------
# The remaining rows of docs/ERRORS.md, one test each.

XM, SXM = spec((G, 16, 256), E4M3), spec((G, 16, 2))  # masked x [G, M_max, K] and its scales


def test_masked_and_moe_out_dtype():
    fails(ValueError, r"out_dtype must be jnp.bfloat16 or jnp.float32",
          functools.partial(fg.grouped_gemm_masked, out_dtype=jnp.float16),
          XM, SIZES, W_KN, SXM, SW_BLOCK_KN)
    fails(ValueError, r"out_dtype must be jnp.bfloat16 or jnp.float32",
          functools.partial(fg.grouped_gemm_moe, out_dtype=jnp.float16),
          spec((50, 256)), SIZES, spec((G, 256, 128)), spec((G, 64, 256)))


def test_grouped_and_dequantize_block_size():
    fails(ValueError, r"block_size must be one of \(64, 128, 256\)",
          functools.partial(fg.grouped_gemm, block_size=100), X, W_KN, SX_ROWS, SW_BLOCK_KN, SIZES)
    fails(ValueError, r"block_size must be one of \(64, 128, 256\)",
          functools.partial(fg.grouped_gemm_masked, block_size=100), XM, SIZES, W_KN, SXM,
          SW_BLOCK_KN)
    fails(ValueError, r"block_size must be one of \(64, 128, 256\)",
          functools.partial(fg.dequantize, block_size=100), A, SA_ROWS)


def test_list_form_and_masked_operand_dtypes():
    x = [spec((5, 256), E4M3), spec((7, 256), F32)]
    w = [spec((256, 200), E4M3)] * 2
    s = [SCALAR] * 2
    fails(TypeError, r"x\[1\] must be float8_e4m3fn or float8_e5m2", fg.grouped_gemm, x, w, s, s)
    fails(TypeError, r"w\[1\] must be float8_e4m3fn or float8_e5m2", fg.grouped_gemm,
          x[:1] * 2, [w[0], spec((256, 200), BF16)], s, s)
    fails(TypeError, r"x must be float8_e4m3fn or float8_e5m2", fg.grouped_gemm_masked,
          spec((G, 16, 256)), SIZES, W_KN, SXM, SW_BLOCK_KN)
    fails(TypeError, r"w must be float8_e4m3fn or float8_e5m2", fg.grouped_gemm_masked,
          XM, SIZES, spec((G, 256, 200), BF16), SXM, SW_BLOCK_KN)


def test_scale_dtypes():
    fails(TypeError, r"scale_a must be float32, got bfloat16", fg.fp8_gemm, A, B_KN,
          spec((), BF16), SCALAR)
    fails(TypeError, r"scales_b must be float32, got bfloat16", fg.fp8_gemm_fine_grained,
          A, B_KN, SA_ROWS, spec((2, 2), BF16))
    fails(TypeError, r"scale_x must be float32, got bfloat16", fg.grouped_gemm, X, W_KN,
          spec((50, 2), BF16), SW_BLOCK_KN, SIZES)
    fails(TypeError, r"scale_w must be float32, got bfloat16", fg.grouped_gemm, X, W_KN,
          SX_ROWS, spec((G, 2, 2), BF16), SIZES)
    fails(TypeError, r"scale_x must be float32, got bfloat16", fg.grouped_gemm_masked, XM,
          SIZES, W_KN, spec((G, 16, 2), BF16), SW_BLOCK_KN)


def test_moe_shapes():
    x, w1, w2 = spec((50, 256)), spec((G, 256, 128)), spec((G, 64, 256))
    fails(ValueError, r"group_sizes has shape \(4,\), expected \(3,\)", fg.grouped_gemm_moe,
          x, spec((4,), I32), w1, w2)
    fails(ValueError, r"expected x \[M, H\], w1 \[G, H, F1\], w2 \[G, F, H\]",
          fg.grouped_gemm_moe, spec((50,)), SIZES, w1, w2)


def test_scalar_a_and_empty_list_form():
    fails(ValueError, r"a must have shape \[\.\.\., M, K\], got \(\)", fg.fp8_gemm,
          spec((), E4M3), B_KN, SCALAR, SCALAR)
    fails(ValueError, r"the list form needs one x, w, scale_x and scale_w per expert, got 0, 0, "
          r"0 and 0", fg.grouped_gemm, [], [], [], [])


def test_flax_checks():
    pytest.importorskip("flax")
    from jax_fp8gemm import flax as fp8_flax
    with pytest.raises(ValueError, match=r"kernel must have shape \[in, features\]"):
        fp8_flax.quantize_kernel(jnp.ones((4, 4, 4)))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 5"):
        fp8_flax.moe_forward(jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((4, 16, 32)),
                             jnp.ones((4, 16, 16)), top_k=5)
    with pytest.raises(ValueError, match=r"inconsistent MoE shapes"):
        fp8_flax.moe_forward(jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((4, 16, 32)),
                             jnp.ones((4, 8, 16)), top_k=2)


def test_flax_quantized_kernel_checked():
    pytest.importorskip("flax")
    from jax_fp8gemm.flax import FP8Dense
    # (flax itself rejects a stored kernel of the wrong shape; the dtype is ours to check)
    params = {"params": {"kernel_fp8_nk": jnp.ones((16, 64)), "kernel_scale": jnp.ones((1, 1)),
                         "bias": jnp.zeros((16,))}}
    with pytest.raises(ValueError, match=r"kernel_fp8_nk must be FP8 \[features, in\] = \(16, 64\)"):
        FP8Dense(16, quantized=True).apply(params, jnp.ones((2, 64)))


def test_grouped_primitive_rejects_row_scales():
    from jax_fp8gemm.primitives import grouped as grouped_prim
    bind = functools.partial(grouped_prim.grouped_contiguous, scale_mode="row", block_size=128,
                             out_dtype=jnp.bfloat16)
    fails(ValueError, r"grouped GEMMs take 'tensor' or 'block' scales, got 'row'", bind,
          spec((1, 50, 256), E4M3), spec((1, G), I32), spec((1, G, 200, 256), E4M3),
          spec((1, 50, 2)), spec((1, G, 2, 2)))


def test_token_permutation_checks():
    x = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match=r"x \[T, H\]"):
        fg.permute_tokens(x, jnp.zeros((5,), jnp.int32), 2)
    with pytest.raises(TypeError, match="integers"):
        fg.permute_tokens(x, jnp.zeros((4, 2)), 2)
    with pytest.raises(ValueError, match="num_tokens"):
        fg.unpermute_tokens(jnp.zeros((8, 3)), jnp.arange(8), jnp.ones((3, 2)), 3)
    with pytest.raises(ValueError, match=r"y_sorted \[T\*k, N\] and order \[T\*k\]"):
        fg.unpermute_tokens(jnp.zeros((8, 3)), jnp.arange(7))
