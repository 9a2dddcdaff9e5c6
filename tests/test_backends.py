"""The CUDA backend against the CPU backend on the same inputs (skipped without a GPU).

Quantization must agree bit for bit. GEMMs and gradients agree to the tensor cores'
rounding: the CPU sums each K block in float32, Hopper's FP8 tensor cores with about 14
significant bits before promotion (tests/helpers.py TENSOR_CORE_RTOL). Written after the
session's last GPU run: the next GPU run is its first."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fp8gemm as fg
from conftest import gpu_device
from helpers import calc_diff, randn

pytestmark = pytest.mark.gpu


@pytest.fixture
def devices():
    gpu = gpu_device()
    if gpu is None:
        pytest.skip("needs a CUDA build of jax_fp8gemm and a JAX GPU device")
    return jax.devices("cpu")[0], gpu


def run_on(device, fn, *args):
    with jax.default_device(device):
        return jax.tree_util.tree_map(np.asarray, jax.jit(fn)(*jax.device_put(args, device)))


def test_quantization_identical(devices, rng):
    x = randn(rng, (300, 520))
    for fn in (fg.quantize_fp8, fg.quantize_fp8_fine_grained,
               lambda v: fg.quantize_fp8_fine_grained(v, block_shape=(128, 128)),
               lambda v: fg.quantize_fp8_fine_grained(v, transpose=True)):
        (q_cpu, s_cpu), (q_gpu, s_gpu) = (run_on(d, fn, x) for d in devices)
        np.testing.assert_array_equal(q_cpu.view(np.uint8), q_gpu.view(np.uint8))
        np.testing.assert_array_equal(s_cpu, s_gpu)


# The CUDA tile kernel splits x into whole tiles (inside x, rows and columns multiples of
# 8) and edge tiles, launched apart: shapes with both, with only edge tiles (rows not a
# multiple of 8), and batched; values include NaN and inf, which poison only their blocks.
@pytest.mark.parametrize("shape", [(1000, 4104), (2, 264, 136), (250, 392)],
                         ids=["whole+edges", "batched", "edges-only"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("block", [64, 128])
def test_tile_quantizers_identical(devices, rng, shape, dtype, block):
    x = np.asarray(randn(rng, shape), np.float32)
    x.reshape(-1)[[5, 7000]] = [np.nan, np.inf]
    x = jnp.asarray(x, dtype)
    fns = (lambda v: fg.quantize_fp8_fine_grained(v, block, transpose=True),
           lambda v: fg.quantize_fp8_fine_grained(v, block, "e5m2", block_shape=(block, block)),
           lambda v: fg.quantize_fp8_fine_grained(v, block),
           lambda v: fg.quantize_fp8_with_transpose(v, block))
    for fn in fns:
        cpu, gpu = (jax.tree_util.tree_leaves(run_on(d, fn, x)) for d in devices)
        for a, b in zip(cpu, gpu):
            a, b = np.asarray(a), np.asarray(b)
            nan = np.isnan(a.astype(np.float32))  # a NaN's sign bit may differ
            np.testing.assert_array_equal(nan, np.isnan(b.astype(np.float32)))
            if a.dtype.itemsize == 1:  # FP8 bytes
                np.testing.assert_array_equal(a.view(np.uint8)[~nan], b.view(np.uint8)[~nan])
            else:  # float32 scales
                np.testing.assert_array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


@pytest.mark.parametrize("recipe", [fg.Recipe(), fg.Recipe(scaling="per_tensor"),
                                    fg.Recipe(block_size=64)], ids=["fine", "per_tensor", "b64"])
def test_fp8_matmul_gradients_match(devices, rng, recipe):
    x, w = randn(rng, (256, 384)), randn(rng, (384, 320), scale=0.05)

    def loss_and_grads(x, w):
        f = lambda x, w: jnp.sum(fg.fp8_matmul(x, w, recipe) ** 2)
        return jax.value_and_grad(f, argnums=(0, 1))(x, w)

    (l_cpu, g_cpu), (l_gpu, g_gpu) = (run_on(d, loss_and_grads, x, w) for d in devices)
    assert abs(l_cpu - l_gpu) <= 1e-3 * abs(l_cpu)
    # dy = 2y differs in the last bits between backends, so an FP8 rounding of dy can flip
    # here and there: compare whole gradients (the FP8 error itself is ~1e-3).
    for a, b in zip(g_cpu, g_gpu):
        assert calc_diff(a, b) < 1e-5


def test_fp8_grouped_matmul_gradients_match(devices, rng):
    x, w = randn(rng, (200, 256)), randn(rng, (3, 256, 192), scale=0.05)
    sizes = np.array([70, 0, 110], np.int32)

    def loss_and_grads(x, w, sizes):
        f = lambda x, w: jnp.sum(fg.fp8_grouped_matmul(x, sizes, w) ** 2)
        return jax.value_and_grad(f, argnums=(0, 1))(x, w)

    (l_cpu, g_cpu), (l_gpu, g_gpu) = (run_on(d, loss_and_grads, x, w, sizes) for d in devices)
    assert abs(l_cpu - l_gpu) <= 1e-3 * abs(l_cpu)
    for a, b in zip(g_cpu, g_gpu):
        assert calc_diff(a, b) < 1e-5
    np.testing.assert_array_equal(g_gpu[0][180:], 0)  # rows past the groups get no gradient
