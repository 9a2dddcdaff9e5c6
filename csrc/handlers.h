// The FFI handler symbols the nanobind module exports (module.cc). Names are
// fp8gemm_<op>_<platform>; the Python side registers them as jax_fp8gemm_<op>_v1.
#pragma once

#include "xla/ffi/api/c_api.h"

#define FP8GEMM_FOR_EACH_OP(X) \
  X(quantize_tensor)           \
  X(quantize_block)            \
  X(quantize_dual)             \
  X(gemm)                      \
  X(grouped_contiguous)        \
  X(grouped_masked)            \
  X(grouped_kgrouped)

#define FP8GEMM_DECLARE(op)                                          \
  extern "C" XLA_FFI_Error* fp8gemm_##op##_cpu(XLA_FFI_CallFrame*);  \
  extern "C" XLA_FFI_Error* fp8gemm_##op##_cuda(XLA_FFI_CallFrame*);
FP8GEMM_FOR_EACH_OP(FP8GEMM_DECLARE)
#undef FP8GEMM_DECLARE
