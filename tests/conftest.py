"""Fixtures shared by the suite: the device a test runs on, and its random inputs."""

import zlib

import jax
import numpy as np
import pytest

import jax_fp8gemm


def pytest_configure(config):
    # Also registered here (not only in pyproject.toml): the GPU run copies tests/ out of the
    # checkout and runs it from elsewhere.
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU with FP8 support (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes seconds on the CPU backend (deselect with -m 'not slow')")


def gpu_device():
    """The first JAX GPU device when this build has the CUDA kernels, else None."""
    if not jax_fp8gemm.cuda_built():
        return None
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    return devices[0] if devices else None


def hopper_device():
    """The GPU device when the Hopper kernels run on it; skips the test otherwise."""
    device = gpu_device()
    if device is None or not jax_fp8gemm.has_fp8_support(device):
        pytest.skip("needs the Hopper kernels")
    return device


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request):
    """Runs the test on one backend: inputs go there with jax.device_put, and everything
    else the test creates lands there too (jax.default_device), so the same test exercises
    the CPU FFI handlers or the CUDA ones."""
    if request.param == "gpu":
        dev = gpu_device()
        if dev is None:
            pytest.skip("needs a CUDA build of jax_fp8gemm and a JAX GPU device")
    else:
        dev = jax.devices("cpu")[0]
    with jax.default_device(dev):
        yield dev


def seed_of(text):
    return zlib.crc32(text.encode())


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from its node id: a failure reproduces when the
    test is rerun alone, yet no two tests draw the same inputs."""
    return np.random.default_rng(seed_of(request.node.nodeid))
