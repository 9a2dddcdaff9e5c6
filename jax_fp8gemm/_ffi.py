"""Loads the extension module and registers its FFI handlers with XLA.

Target names carry a version suffix: a change to a handler's operands or attributes bumps
it, so programs serialized against an older contract fail loudly instead of misreading
buffers.
"""

from __future__ import annotations

import jax
from jax.interpreters import mlir

from . import _jax_fp8gemm

FFI_VERSION = "v1"


def target_name(op: str) -> str:
    return f"jax_fp8gemm_{op}_{FFI_VERSION}"


for _platform, _handlers in _jax_fp8gemm.registrations().items():
    for _op, _capsule in _handlers.items():
        jax.ffi.register_ffi_target(target_name(_op), _capsule, platform=_platform)

CUDA_BUILT: bool = _jax_fp8gemm.cuda_built()


def register_lowering(prim, op: str, attrs, *, aliases=None) -> None:
    """Lowers `prim` to the FFI target of `op` on CPU and, when built, CUDA.

    attrs(**params) -> dict of FFI attributes; aliases(num_operands) -> {operand: result}
    for in-place accumulation, or None.
    """

    def rule(ctx, *operands, **params):
        extra = {}
        if aliases is not None and (alias := aliases(len(operands))):
            extra["operand_output_aliases"] = alias
        lower = jax.ffi.ffi_lowering(target_name(op), **extra)
        return lower(ctx, *operands, **attrs(**params))

    mlir.register_lowering(prim, rule, platform="cpu")
    if CUDA_BUILT:
        mlir.register_lowering(prim, rule, platform="cuda")
