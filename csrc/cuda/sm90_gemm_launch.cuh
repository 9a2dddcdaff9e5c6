// Host side of one tile configuration of the Hopper GEMM (dense and grouped): TMA
// descriptors, the kernel's shared-memory limit, the launch. Each tile shape is compiled in its own
// translation unit (sm90_tiles_<BLOCK_M>.cu) so that the build runs them in parallel;
// sm90_gemm.cu chooses among them.
#pragma once

#include <cudaTypedefs.h>

#include <atomic>

#include "cuda_utils.cuh"
#include "sm90_gemm.cuh"

namespace fp8gemm::sm90 {

constexpr int kMaxDevices = 64;
constexpr int kMaxSmem = 232448;  // dynamic shared memory per block on sm_90 (227 KB)

// The deepest pipeline (at most 16 stages, as DeepGEMM) whose shared storage fits. Only the
// 64-row tiles go past 8 (64x16 takes 10 KB a stage): where M = 64 / 128 streams the weights
// over a long K (64x64 at K = 7168, the narrow tiles at K = 16384) the extra stages gain
// 6-10%, at K <= 2048 nothing (docs/PERF.md, tenth session).
template <int BLOCK_M, int BLOCK_N, int kScaleBlock, bool kRowB, int kStages = 16>
constexpr int max_stages() {
  if constexpr (kStages <= 2 || sizeof(SharedStorage<BLOCK_M, BLOCK_N, kStages, kScaleBlock,
                                                     kRowB>) <= kMaxSmem) {
    return kStages;
  } else {
    return max_stages<BLOCK_M, BLOCK_N, kScaleBlock, kRowB, kStages - 1>();
  }
}

inline PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
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
inline bool make_map(CUtensorMap* map, const uint8_t* data, int64_t rows, int64_t k,
                     int box_rows) {
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

// Scales [rows, ld] (float32: a's or b's rows, or b's column blocks) read in (box_rows, 4)
// boxes: four K blocks of box_rows rows, 16 bytes per row (TMA's smallest inner box);
// out-of-bounds parts read as zeros.
// TMA needs 16-byte aligned rows: false, with *map untouched, when they are not.
inline bool make_scale_map(CUtensorMap* map, const float* data, int64_t rows, int64_t ld,
                           int box_rows) {
  auto encode = encode_fn();
  if (!encode || ld % 4 != 0 || reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(ld), static_cast<cuuint64_t>(rows)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld * sizeof(float))};
  cuuint32_t box[2] = {4, static_cast<cuuint32_t>(box_rows)};
  cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, const_cast<float*>(data), dims, strides,
                box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_NONE,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The FP8 operands of one launch: a's and b's K-major rows (TMA maps cover a_rows and b_rows
// rows; grouped GEMMs map every group's rows at once), their formats and scale block size.
struct Operands {
  const uint8_t* a;
  int64_t a_rows;
  const uint8_t* b;
  int64_t b_rows;
  Fp8Format fa, fb;
  int block;
};

// Whether the scheduler's 32-bit tile numbers cover the problem: at most every row tile of
// a (one more per group: M-grouped groups end in partial tiles), or the dense tiles of every
// group's output (k-grouped), times the column tiles. (An output that large would not fit
// in a GPU's memory; the check keeps the kernel's arithmetic honest all the same.)
template <int BLOCK_M, int BLOCK_N>
bool tile_count_fits(const Operands& ops, const GemmParams& p) {
  const int64_t groups = p.batch * p.groups;
  const int64_t row_tiles = p.k_sizes != nullptr ? ceil_div(p.m, int64_t(BLOCK_M)) * groups
                            : p.sizes != nullptr ? ceil_div(ops.a_rows, int64_t(BLOCK_M)) + groups
                                                 : ceil_div(p.m, int64_t(BLOCK_M));
  const int64_t col_tiles = ceil_div(p.n, int64_t(BLOCK_N));
  return row_tiles < (int64_t(1) << 31) / col_tiles;
}

template <int BLOCK_M, int BLOCK_N, int kScaleBlock, bool kRowB, Fp8Format FA, Fp8Format FB>
ffi::Error launch(const Operands& ops, const GemmParams& params, cudaStream_t stream, int sms) {
  constexpr int kStages = max_stages<BLOCK_M, BLOCK_N, kScaleBlock, kRowB>();
  using Cfg = GemmConfig<BLOCK_M, BLOCK_N, kStages, kScaleBlock, kRowB, FA, FB>;
  constexpr int kSmem = sizeof(typename Cfg::Storage);
  static_assert(kSmem <= kMaxSmem, "shared storage of the tile does not fit");
  if (!tile_count_fits<BLOCK_M, BLOCK_N>(ops, params)) {
    return ffi::Error::InvalidArgument("jax_fp8gemm: too many output tiles for one launch");
  }
  auto kernel = sm90_fp8_gemm_kernel<Cfg, BLOCK_M, BLOCK_N, kStages, kScaleBlock, FA, FB>;
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
  CUtensorMap map_a, map_b, map_sa{}, map_sb{};
  if (!make_map(&map_a, ops.a, ops.a_rows, params.k, BLOCK_M) ||
      !make_map(&map_b, ops.b, ops.b_rows, params.k, BLOCK_N)) {
    return ffi::Error::Internal("jax_fp8gemm: cuTensorMapEncodeTiled failed");
  }
  // Scales by TMA when asked for and their rows are 16-byte aligned; else the producer
  // copies them. b's block scales: every expert's ceil(N / block) rows, three per box (the
  // column blocks a tile can span).
  GemmParams p = params;
  p.sa_tma = p.sa_tma && !p.tensor_scales &&
             make_scale_map(&map_sa, p.sa, ops.a_rows, p.sa_ld, BLOCK_M);
  if (kRowB) {
    p.sb_tma = p.sb_tma && make_scale_map(&map_sb, p.sb, ops.b_rows, p.sb_ld, BLOCK_N);
  } else {
    const int64_t sb_rows = ops.b_rows / p.n * ceil_div(p.n, int64_t(kScaleBlock));
    p.sb_tma = p.sb_tma && !p.tensor_scales && make_scale_map(&map_sb, p.sb, sb_rows, p.sb_ld, 3);
  }
  // An M-grouped GEMM's tile count lives on the device (its group sizes): one CTA per SM.
  // A k-grouped one has the dense count for every group.
  const int64_t tiles =
      p.sizes != nullptr ? sms
                         : Scheduler<BLOCK_M, BLOCK_N, kRowB>::dense_tiles(p.m, p.n) *
                               (p.k_sizes != nullptr ? p.batch * p.groups : 1);
  const int grid = static_cast<int>(tiles < sms ? tiles : sms);
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(map_a, map_b, map_sa, map_sb, p);
  return cuda::launch_status("sm90_fp8_gemm_kernel");
}

// Whether a tile shape runs a scale block size: the combinations that would spill registers
// (64-wide blocks promote twice per stage; row scales read a scale per column) are left out,
// and the host chooses among the others.
constexpr bool tile_compiled(int block_m, int block, bool row_b) {
  if (row_b) return block_m == 64 || block != 64;
  return !(block_m == 256 && block == 64);
}

// Every scale block size and FP8 format pair of one tile shape; b's scales per block
// (kRowB false: also per-tensor scaling) or per row.
template <int BLOCK_M, int BLOCK_N, bool kRowB>
ffi::Error launch_tile(const Operands& ops, const GemmParams& params, cudaStream_t stream,
                       int sms) {
  constexpr Fp8Format E4 = Fp8Format::kE4M3, E5 = Fp8Format::kE5M2;
  const bool a4 = ops.fa == E4, b4 = ops.fb == E4;
  auto formats = [&](auto block) -> ffi::Error {
    constexpr int kBlock = decltype(block)::value;
    if constexpr (!tile_compiled(BLOCK_M, kBlock, kRowB)) {
      return ffi::Error::Internal("jax_fp8gemm: Hopper tile not compiled for this block size");
    } else if (a4 && b4) {
      return launch<BLOCK_M, BLOCK_N, kBlock, kRowB, E4, E4>(ops, params, stream, sms);
    } else if (a4) {
      return launch<BLOCK_M, BLOCK_N, kBlock, kRowB, E4, E5>(ops, params, stream, sms);
    } else if (b4) {
      return launch<BLOCK_M, BLOCK_N, kBlock, kRowB, E5, E4>(ops, params, stream, sms);
    } else {
      return launch<BLOCK_M, BLOCK_N, kBlock, kRowB, E5, E5>(ops, params, stream, sms);
    }
  };
  switch (ops.block) {
    case 64: return formats(std::integral_constant<int, 64>{});
    case 256: return formats(std::integral_constant<int, 256>{});
    default: return formats(std::integral_constant<int, 128>{});
  }
}

// The tile shapes compiled into the library, X(BLOCK_M, BLOCK_N, kRowB), one list per
// BLOCK_M: sm90_tiles_<BLOCK_M>.cu instantiates its list, sm90_gemm.cu chooses among all of
// them. Tensor and block scales run on every shape; row scales (the weight gradient) on
// four (tile_compiled has the exceptions).
#define FP8GEMM_SM90_TILES_64(X) \
  X(64, 16, false) X(64, 32, false) X(64, 64, false) X(64, 128, false) X(64, 192, false) \
  X(64, 64, true) X(64, 128, true)
#define FP8GEMM_SM90_TILES_128(X) \
  X(128, 128, false) X(128, 160, false) X(128, 192, false) X(128, 128, true)
#define FP8GEMM_SM90_TILES_256(X) X(256, 128, false) X(256, 128, true)
#define FP8GEMM_SM90_TILES(X) \
  FP8GEMM_SM90_TILES_64(X) FP8GEMM_SM90_TILES_128(X) FP8GEMM_SM90_TILES_256(X)

#define FP8GEMM_SM90_DECLARE_TILE(BM, BN, ROW)                                       \
  extern template ffi::Error launch_tile<BM, BN, ROW>(const Operands&, const GemmParams&, \
                                                      cudaStream_t, int);
#define FP8GEMM_SM90_INSTANTIATE_TILE(BM, BN, ROW)                                      \
  template ffi::Error launch_tile<BM, BN, ROW>(const Operands&, const GemmParams&, \
                                               cudaStream_t, int);

FP8GEMM_SM90_TILES(FP8GEMM_SM90_DECLARE_TILE)

}  // namespace fp8gemm::sm90
