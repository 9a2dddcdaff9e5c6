// Small helpers shared by the portable CUDA kernels (quantize_cuda.cu, gemm_cuda.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/ops.h"

namespace fp8gemm::cuda {

// Grids are capped and kernels loop over their tasks (task = blockIdx.x; ...; += gridDim.x),
// so any problem size fits in gridDim.x and per-task indices stay 64-bit.
constexpr int64_t kMaxGridBlocks = 65535;

inline unsigned grid_for(int64_t tasks) {
  return static_cast<unsigned>(tasks < kMaxGridBlocks ? tasks : kMaxGridBlocks);
}

// Status of a runtime call that returns one (cudaMemsetAsync).
inline ffi::Error cuda_status(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_fp8gemm: ") + what + ": " +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// Called right after every launch, so that a launch that failed (bad configuration, no
// kernel image for the device) becomes an FFI error instead of a silently skipped kernel.
inline ffi::Error launch_status(const char* what) {
  return cuda_status(cudaGetLastError(), what);
}

// The float input dtypes of the quantizers, as a template parameter (bf16 and f16 are both
// 16-bit payloads, so the C++ element type alone cannot tell them apart).
enum class InType { kF32, kBF16, kF16 };

// Exact half -> float in one instruction (fp8.h's f16_to_float is the portable spelling).
__device__ __forceinline__ float f16_bits_to_float(uint16_t v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}

template <InType T>
__device__ __forceinline__ float load_input(const void* x, int64_t i) {
  if constexpr (T == InType::kBF16) return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
  if constexpr (T == InType::kF16) return f16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
  if constexpr (T == InType::kF32) return static_cast<const float*>(x)[i];
}

// float -> FP8 (fp8.h's float_to_fp8: round to nearest even, saturate to the largest finite
// value, NaN stays NaN), two values at once: lo in the low byte, hi in the high byte. Ada
// and Hopper have it in hardware (cvt.rn.satfinite), one instruction per pair instead of the
// dozens a value of the portable spelling, which would make the quantizers compute-bound;
// older GPUs run the portable one.
__device__ __forceinline__ uint16_t to_fp8x2(float lo, float hi, Fp8Format f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint16_t pair;
  if (f == Fp8Format::kE4M3) {
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(hi), "f"(lo));
  }
  return pair;  // the second source lands in the low byte
#else
  return static_cast<uint16_t>(float_to_fp8(lo, f) | float_to_fp8(hi, f) << 8);
#endif
}

__device__ __forceinline__ uint8_t to_fp8(float x, Fp8Format f) {
  return static_cast<uint8_t>(to_fp8x2(x, 0.0f, f));
}

template <InType T>
using InTag = std::integral_constant<InType, T>;

// Calls fn(InTag<T>{}) for the runtime dtype (already validated by ops.h); the callee reads
// the type back as decltype(tag)::value.
template <typename Fn>
ffi::Error dispatch_input(ffi::DataType t, Fn&& fn) {
  switch (t) {
    case ffi::DataType::BF16: return fn(InTag<InType::kBF16>{});
    case ffi::DataType::F16: return fn(InTag<InType::kF16>{});
    default: return fn(InTag<InType::kF32>{});
  }
}

// |x| as bits. Non-negative floats order like their bit patterns and every NaN's magnitude
// bits exceed +inf's, so an unsigned max over these is the NaN-propagating amax of
// amax_update (fp8.h), independent of the reduction order (and usable with atomicMax).
__device__ __forceinline__ uint32_t abs_bits(float x) { return float_to_bits(fabsf(x)); }

__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
  return __reduce_max_sync(0xffffffffu, v);  // sm_80+, every target of this build
}

}  // namespace fp8gemm::cuda
