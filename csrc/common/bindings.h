// The FFI signature of every op, written once for both platforms: operands, results and
// attributes in the order the Python lowerings emit them (jax_fp8gemm/primitives/). `B` is
// ffi::Ffi::Bind() on the CPU and ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()
// on CUDA.
#pragma once

#include "xla/ffi/api/ffi.h"

#define FP8GEMM_BIND_QUANTIZE_TENSOR(B) \
  B.Arg<ffi::AnyBuffer>()   /* x */      \
      .Ret<ffi::AnyBuffer>() /* x_fp8 */ \
      .Ret<ffi::AnyBuffer>() /* scale */

#define FP8GEMM_BIND_QUANTIZE_BLOCK(B)    \
  B.Arg<ffi::AnyBuffer>()     /* x */      \
      .Ret<ffi::AnyBuffer>()  /* x_fp8 */  \
      .Ret<ffi::AnyBuffer>()  /* scales */ \
      .Attr<int64_t>("block_rows")         \
      .Attr<int64_t>("block_cols")         \
      .Attr<bool>("transpose")

#define FP8GEMM_BIND_QUANTIZE_DUAL(B)      \
  B.Arg<ffi::AnyBuffer>()     /* x */         \
      .Ret<ffi::AnyBuffer>()  /* x_fp8 */     \
      .Ret<ffi::AnyBuffer>()  /* scales */    \
      .Ret<ffi::AnyBuffer>()  /* xt_fp8 */    \
      .Ret<ffi::AnyBuffer>()  /* scales_t */  \
      .Attr<int64_t>("block_size")

#define FP8GEMM_BIND_GEMM(B)                        \
  B.Arg<ffi::AnyBuffer>()             /* a */           \
      .Arg<ffi::AnyBuffer>()          /* b */           \
      .Arg<ffi::AnyBuffer>()          /* scale_a */     \
      .Arg<ffi::AnyBuffer>()          /* scale_b */     \
      .OptionalArg<ffi::AnyBuffer>()  /* accumulator */ \
      .Ret<ffi::AnyBuffer>()                            \
      .Attr<int64_t>("scale_mode")                      \
      .Attr<int64_t>("block_size")

// Grouped contiguous and masked GEMMs share one signature.
#define FP8GEMM_BIND_GROUPED(B)                   \
  B.Arg<ffi::AnyBuffer>()     /* x */                  \
      .Arg<ffi::AnyBuffer>()  /* group_sizes, masked_m */ \
      .Arg<ffi::AnyBuffer>()  /* w */                  \
      .Arg<ffi::AnyBuffer>()  /* scale_x */            \
      .Arg<ffi::AnyBuffer>()  /* scale_w */            \
      .Ret<ffi::AnyBuffer>()                           \
      .Attr<int64_t>("scale_mode")                     \
      .Attr<int64_t>("block_size")

#define FP8GEMM_BIND_KGROUPED(B)                    \
  B.Arg<ffi::AnyBuffer>()             /* a */           \
      .Arg<ffi::AnyBuffer>()          /* b */           \
      .Arg<ffi::AnyBuffer>()          /* group_sizes */ \
      .Arg<ffi::AnyBuffer>()          /* scale_a */     \
      .Arg<ffi::AnyBuffer>()          /* scale_b */     \
      .OptionalArg<ffi::AnyBuffer>()  /* accumulator */ \
      .Ret<ffi::AnyBuffer>()                            \
      .Attr<int64_t>("block_size")
