"""jax_fp8gemm: DeepSeek-style fine-grained FP8 matrix multiplication for JAX.

Quantization (per-tensor and fine-grained), dense and grouped (MoE) FP8 GEMMs, a
differentiable FP8 matmul for training, all as XLA FFI custom calls with CPU and CUDA
(Hopper) backends. See README.md.
"""

from ._ffi import CUDA_BUILT as _CUDA_BUILT
from .autodiff import Recipe, fp8_grouped_matmul, fp8_matmul
from .gemm import fp8_gemm, fp8_gemm_fine_grained
from .grouped import (grouped_gemm, grouped_gemm_masked, grouped_gemm_moe, permute_tokens,
                      unpermute_tokens)
from .quantization import (compute_scales, dequantize, quantize_fp8, quantize_fp8_fine_grained,
                           quantize_fp8_with_transpose)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "has_fp8_support",
    "cuda_built",
    "quantize_fp8",
    "quantize_fp8_fine_grained",
    "quantize_fp8_with_transpose",
    "compute_scales",
    "dequantize",
    "fp8_gemm",
    "fp8_gemm_fine_grained",
    "grouped_gemm",
    "grouped_gemm_masked",
    "grouped_gemm_moe",
    "permute_tokens",
    "unpermute_tokens",
    "fp8_matmul",
    "fp8_grouped_matmul",
    "Recipe",
]


def cuda_built() -> bool:
    """Whether this build of the library contains the CUDA kernels."""
    return _CUDA_BUILT


def has_fp8_support(device=None) -> bool:
    """True where the Hopper FP8 tensor-core kernels run: a CUDA build and a compute
    capability 9.0 GPU. `device` defaults to jax.devices()[0]. False on the CPU, and on
    Ampere and Ada GPUs, where every op still runs (on the portable kernels)."""
    import jax

    if not _CUDA_BUILT:
        return False
    if device is None:
        device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    return str(getattr(device, "compute_capability", "")) == "9.0"
