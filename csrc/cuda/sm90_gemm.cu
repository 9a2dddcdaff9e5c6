// Host side of the Hopper dense GEMM: tile choice, TMA descriptors, launch.
#include "sm90_gemm.h"

#include <cudaTypedefs.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_utils.cuh"
#include "sm90_gemm.cuh"

namespace fp8gemm::sm90 {
namespace {

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int sms = 0;
  bool hopper = false;
};

// Every device's properties, read once (thread-safe static initialization).
DeviceInfo device_info() {
  static const std::vector<DeviceInfo> info = [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
    std::vector<DeviceInfo> all(count);
    for (int d = 0; d < count; ++d) {
      int major = 0, minor = 0;
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d);
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d);
      cudaDeviceGetAttribute(&all[d].sms, cudaDevAttrMultiProcessorCount, d);
      all[d].hopper = major == 9 && minor == 0;
    }
    return all;
  }();
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= static_cast<int>(info.size())) {
    return {};
  }
  return info[dev];
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                     &status);
    return status == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr)
               : nullptr;
  }();
  return fn;
}

// A [rows, k] K-major FP8 matrix read in (box_rows, 128) boxes with 128-byte swizzling;
// out-of-bounds parts of a box read as zeros.
bool make_map(CUtensorMap* map, const uint8_t* data, int64_t rows, int64_t k, int box_rows) {
  auto encode = encode_fn();
  if (!encode) return false;
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(k)};
  cuuint32_t box[2] = {static_cast<cuuint32_t>(kBlockK), static_cast<cuuint32_t>(box_rows)};
  cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(data), dims, strides,
                box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int BLOCK_M, int BLOCK_N, int kStages, int kScaleBlock, Fp8Format FA, Fp8Format FB>
ffi::Error launch(const Problem& pr, const GemmParams& params, cudaStream_t stream, int sms) {
  using Cfg = GemmConfig<BLOCK_M, BLOCK_N, kStages, kScaleBlock, FA, FB>;
  auto kernel = sm90_fp8_gemm_kernel<Cfg, BLOCK_M, BLOCK_N, kStages, kScaleBlock, FA, FB>;
  constexpr int kSmem = sizeof(typename Cfg::Storage);
  // The shared-memory limit is a per-device attribute of the kernel: set it once per device.
  static std::atomic<bool> configured[kMaxDevices];
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= kMaxDevices || !configured[dev].load()) {
    FP8GEMM_RETURN_IF_ERROR(cuda::cuda_status(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
        "sm90_fp8_gemm_kernel smem"));
    if (dev >= 0 && dev < kMaxDevices) configured[dev].store(true);
  }
  CUtensorMap map_a, map_b;
  if (!make_map(&map_a, pr.a.data, params.m, params.k, BLOCK_M) ||
      !make_map(&map_b, pr.b.data, params.n, params.k, BLOCK_N)) {
    return ffi::Error::Internal("jax_fp8gemm: cuTensorMapEncodeTiled failed");
  }
  const int64_t tiles = DenseScheduler<BLOCK_M, BLOCK_N>(params.m, params.n).num_tiles();
  const int grid = static_cast<int>(tiles < sms ? tiles : sms);
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(map_a, map_b, params);
  return cuda::launch_status("sm90_fp8_gemm_kernel");
}

template <int BLOCK_M, int BLOCK_N, int kStages, Fp8Format FA, Fp8Format FB>
ffi::Error launch_block(const Problem& pr, const GemmParams& params, int64_t block,
                        cudaStream_t stream, int sms) {
  switch (block) {
    case 64: return launch<BLOCK_M, BLOCK_N, kStages, 64, FA, FB>(pr, params, stream, sms);
    case 256: return launch<BLOCK_M, BLOCK_N, kStages, 256, FA, FB>(pr, params, stream, sms);
    default: return launch<BLOCK_M, BLOCK_N, kStages, 128, FA, FB>(pr, params, stream, sms);
  }
}

template <int BLOCK_M, int BLOCK_N, int kStages>
ffi::Error launch_formats(const Problem& pr, const GemmParams& params, cudaStream_t stream,
                          int sms) {
  constexpr Fp8Format E4 = Fp8Format::kE4M3, E5 = Fp8Format::kE5M2;
  const int64_t b = pr.block;
  const bool a4 = pr.a.format == E4, b4 = pr.b.format == E4;
  if (a4 && b4) return launch_block<BLOCK_M, BLOCK_N, kStages, E4, E4>(pr, params, b, stream, sms);
  if (a4) return launch_block<BLOCK_M, BLOCK_N, kStages, E4, E5>(pr, params, b, stream, sms);
  if (b4) return launch_block<BLOCK_M, BLOCK_N, kStages, E5, E4>(pr, params, b, stream, sms);
  return launch_block<BLOCK_M, BLOCK_N, kStages, E5, E5>(pr, params, b, stream, sms);
}

}  // namespace

bool enabled() {
  const char* env = std::getenv("JAX_FP8GEMM_PORTABLE_KERNELS");
  if (env && std::string(env) == "1") return false;
  return device_info().hopper;
}

bool gemm(const Problem& p, ScaleMode mode, cudaStream_t stream, ffi::Error* status) {
  const int64_t k = p.k_end;
  if (!enabled() || mode == ScaleMode::kRow || p.k_begin != 0 ||
      k % 16 != 0 || p.a.ld != k || p.b.ld != k || p.ldo != p.cols || p.rows == 0 ||
      p.cols == 0 || k == 0) {
    return false;
  }
  GemmParams params;
  params.m = p.rows;
  params.n = p.cols;
  params.k = k;
  params.sa = p.a.scale.ptr;
  params.sb = p.b.scale.ptr;
  params.sa_ld = p.a.scale.row_stride;
  params.sb_ld = p.b.scale.row_stride;
  params.tensor_scales = mode == ScaleMode::kTensor;
  params.out = p.out;
  params.c = p.c;
  params.out_f32 = p.out_type == OutType::kF32;
  const int sms = device_info().sms;
  // Tile choice (docs/PERF.md has the measurements): 64 rows when M fits in them
  // (decode-sized batches); 128 rows with the double-buffered mainloop up to 128; else 256
  // rows, whose B tiles feed four 64-row wgmmas (a quarter less L2 traffic per FLOP than
  // 128 x 128, which measured 15-30% slower on the large shapes even double-buffered).
  // JAX_FP8GEMM_SM90_BLOCK_M (64, 128 or 256) overrides the choice, for tuning.
  const char* force_m = std::getenv("JAX_FP8GEMM_SM90_BLOCK_M");
  const int block_m = force_m ? std::atoi(force_m) : (p.rows <= 64 ? 64 : p.rows <= 128 ? 128 : 256);
  if (block_m == 64) {
    *status = launch_formats<64, 128, 8>(p, params, stream, sms);
  } else if (block_m == 256) {
    *status = launch_formats<256, 128, 4>(p, params, stream, sms);
  } else {
    *status = launch_formats<128, 128, 6>(p, params, stream, sms);
  }
  return true;
}

}  // namespace fp8gemm::sm90
