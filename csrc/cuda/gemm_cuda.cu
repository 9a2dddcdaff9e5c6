// CUDA handlers of the GEMM primitives: dense, grouped (contiguous and masked) and
// k-grouped. On Hopper they first offer the call to the sm90 kernel (sm90_gemm.h); the
// portable kernel below runs the rest. It is simple and correct rather than fast; it
// evaluates the same Problems (common/problem.h) as cpu/gemm_cpu.cc, with the same
// two-level accumulation.
//
// One kernel, portable_gemm_kernel<Tiles>, computes kTileM x kTileN output tiles of
// Problems. The Tiles policy turns a flat tile index into (Problem, row0, col0) on the
// device, so grouped GEMMs read their group sizes where they live (device memory; nothing
// is copied to the host and nothing synchronizes, as command buffers require):
//   DenseTiles       row tiles x col tiles of the one problem;
//   MaskedTiles      B x G x ceil(M / kTileM) row-tile slots x col tiles; a slot past its
//                    group's masked_m is skipped;
//   ContiguousTiles  B x (ceil(M / kTileM) + G) slots x col tiles (every group's row tiles
//                    fit in that many); a slot is mapped to (group, tile) by walking the
//                    group sizes; slots past the last group's tiles are skipped;
//   KGroupedTiles    B x G x row tiles x col tiles; every tile exists (an empty token range
//                    still writes c or zeros).
// Grids are capped and CTAs loop over tile indices, so any tile count fits.
//
// Per tile: 256 threads, each owning 4 x 4 outputs strided by 16 rows / 16 columns (so the
// shared-memory reads of a warp hit distinct banks or broadcast). K runs one K block at a
// time; inside a block kTileK-wide chunks of A and B are decoded through a 256-entry
// shared-memory LUT into float tiles, zero-padded past the rows, columns and the block's K
// range, and summed in float32 with FMAs (exact products of FP8 values, so an FMA rounds as
// the CPU's multiply-then-add). At each block's end the partial sums are promoted as
// acc = acc + partial * (scale_a * scale_b), with explicitly rounded operations so that nvcc
// does not contract them into an FMA the CPU backend does not perform. Every output is
// written once, by one thread, after a fixed-order loop: results are deterministic.
#include "../common/ops.h"
#include "../common/bindings.h"
#include "../handlers.h"
#include "cuda_utils.cuh"
#include "sm90_gemm.h"

namespace fp8gemm::cuda {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kThreads = 256;
constexpr int kThreadsN = 16;                       // threads along a tile's columns
constexpr int kThreadsM = kThreads / kThreadsN;     // and along its rows
constexpr int kRowsPerThread = kTileM / kThreadsM;
constexpr int kColsPerThread = kTileN / kThreadsN;
constexpr int kPitch = kTileK + 1;  // odd pitch: a warp's staging stores hit distinct banks

static_assert(kThreads == 256, "the FP8 decode LUTs are filled one entry per thread");
static_assert(kThreads % kThreadsN == 0, "whole rows of threads");
static_assert(kTileM % kThreadsM == 0 && kTileN % kThreadsN == 0,
              "every thread owns the same number of outputs");
static_assert(kThreads % kTileK == 0 && kTileM % (kThreads / kTileK) == 0 &&
                  kTileN % (kThreads / kTileK) == 0,
              "staging: each thread owns one K column and a fixed stride of rows");
static_assert(64 % kTileK == 0, "chunks tile every K block size (64, 128, 256)");

struct Smem {
  float a[kTileM][kPitch];  // [row][k] of the current chunk, decoded
  float b[kTileN][kPitch];
  float lut_a[256];  // fp8 byte -> float, per operand (their formats may differ)
  float lut_b[256];
};

// Stages rows [row0, row0 + kRows) x K [k0, k0 + kTileK) of op into dst, zero past `rows`
// and past k_hi (the end of the current K block). Each thread owns one K column and every
// kRowStep-th row: a warp reads 32 consecutive bytes of a row (coalesced) and stores 32
// consecutive words (no bank conflicts).
template <int kRows>
__device__ __forceinline__ void stage(const OperandView& op, int64_t row0, int64_t rows,
                                      int64_t k0, int64_t k_hi, const float* lut,
                                      float (*dst)[kPitch]) {
  constexpr int kRowStep = kThreads / kTileK;
  const int kk = threadIdx.x % kTileK;
  const bool k_ok = k0 + kk < k_hi;
  const uint8_t* src = op.data + k0 + kk;
#pragma unroll
  for (int r = threadIdx.x / kTileK; r < kRows; r += kRowStep) {
    const int64_t row = row0 + r;
    dst[r][kk] = (k_ok && row < rows) ? lut[src[row * op.ld]] : 0.0f;
  }
}

// Computes and stores the tile of p at (r0, c0). Must be called by the whole CTA with the
// same arguments (it synchronizes).
__device__ void gemm_tile(const Problem& p, int64_t r0, int64_t c0, Smem& s) {
  const int tx = threadIdx.x % kThreadsN, ty = threadIdx.x / kThreadsN;
  float acc[kRowsPerThread][kColsPerThread] = {};
  const int64_t k_begin = p.k_begin, k_end = max(p.k_begin, p.k_end);
  if (k_end > k_begin) {
    // K blocks are aligned to absolute multiples of p.block; the range may cut the first
    // and last ones.
    const int64_t kb_first = k_begin / p.block, kb_last = (k_end - 1) / p.block;
    for (int64_t kb = kb_first; kb <= kb_last; ++kb) {
      const int64_t lo = max(k_begin, kb * p.block), hi = min(k_end, (kb + 1) * p.block);
      float part[kRowsPerThread][kColsPerThread] = {};
      for (int64_t k0 = lo; k0 < hi; k0 += kTileK) {
        __syncthreads();  // nobody still reads the previous chunk (or tile)
        stage<kTileM>(p.a, r0, p.rows, k0, hi, s.lut_a, s.a);
        stage<kTileN>(p.b, c0, p.cols, k0, hi, s.lut_b, s.b);
        __syncthreads();
        // Zero padding adds exact +0 products, which leave every partial sum unchanged.
#pragma unroll 4
        for (int kk = 0; kk < kTileK; ++kk) {
          float av[kRowsPerThread], bv[kColsPerThread];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) av[i] = s.a[ty + i * kThreadsM][kk];
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) bv[j] = s.b[tx + j * kThreadsN][kk];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
            for (int j = 0; j < kColsPerThread; ++j) part[i][j] = fmaf(av[i], bv[j], part[i][j]);
        }
      }
      // Rows/cols past the problem are computed but never stored; their scale reads are
      // clamped so that they stay inside the scale arrays too.
      float sa[kRowsPerThread], sb[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
        sa[i] = p.a.scale.at(min(r0 + ty + i * kThreadsM, p.rows - 1), kb);
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j)
        sb[j] = p.b.scale.at(min(c0 + tx + j * kThreadsN, p.cols - 1), kb);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j)
          acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(part[i][j], __fmul_rn(sa[i], sb[j])));
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = r0 + ty + i * kThreadsM;
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t col = c0 + tx + j * kThreadsN;
      if (row >= p.rows || col >= p.cols) continue;
      const int64_t idx = row * p.ldo + col;
      // c may alias out: this thread reads c[idx] and then writes out[idx], nothing else.
      const float v = p.c ? __fadd_rn(acc[i][j], p.c[idx]) : acc[i][j];
      if (p.out_type == OutType::kF32) {
        static_cast<float*>(p.out)[idx] = v;
      } else {
        static_cast<uint16_t*>(p.out)[idx] = float_to_bf16(v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tile policies: get(t, ...) maps tile index t to its problem and tile origin, or returns
// false for an empty slot. One thread per CTA calls it and shares the result through shared
// memory, so the whole CTA agrees on the tile (gemm_tile's barriers require that).

struct DenseTiles {
  Problem p;
  int64_t col_tiles;
  __device__ bool get(int64_t t, Problem* out, int64_t* r0, int64_t* c0) const {
    *out = p;
    *r0 = t / col_tiles * kTileM;
    *c0 = t % col_tiles * kTileN;
    return true;
  }
};

struct MaskedTiles {
  GroupedOp op;
  int64_t row_tiles, col_tiles;  // row_tiles = ceil(M / kTileM) per (b, g)
  __device__ bool get(int64_t t, Problem* out, int64_t* r0, int64_t* c0) const {
    *c0 = t % col_tiles * kTileN;
    t /= col_tiles;
    *r0 = t % row_tiles * kTileM;
    t /= row_tiles;
    const int64_t g = t % op.groups, b = t / op.groups;
    const int64_t rows = masked_rows(op.sizes[b * op.groups + g], op.m);
    if (*r0 >= rows) return false;
    *out = op.problem(b, g, g * op.m, g * op.m + rows);
    return true;
  }
};

struct ContiguousTiles {
  GroupedOp op;
  int64_t slots, col_tiles;  // slots = ceil(M / kTileM) + G per batch entry
  __device__ bool get(int64_t t, Problem* out, int64_t* r0, int64_t* c0) const {
    *c0 = t % col_tiles * kTileN;
    t /= col_tiles;
    int64_t slot = t % slots;
    const int64_t b = t / slots;
    const int32_t* sizes = op.sizes + b * op.groups;
    // Walk the groups in order, counting their row tiles, until the one owning `slot`.
    // end is group_rows' end of group g, computed incrementally (calling group_rows per
    // group would make this walk quadratic in G); the owning group's range then comes from
    // group_rows itself.
    int64_t offset = 0, begin = 0;
    for (int64_t g = 0; g < op.groups; ++g) {
      offset += sizes[g] > 0 ? sizes[g] : 0;
      const int64_t end = offset < op.m ? offset : op.m;
      const int64_t tiles = ceil_div(end - begin, kTileM);
      if (slot < tiles) {
        int64_t g0, g1;
        group_rows(sizes, g, op.m, &g0, &g1);
        *r0 = slot * kTileM;
        if (*r0 >= g1 - g0) return false;  // unreachable while the walk agrees with group_rows
        *out = op.problem(b, g, g0, g1);
        return true;
      }
      slot -= tiles;
      begin = end;
    }
    return false;
  }
};

struct KGroupedTiles {
  KGroupedOp op;
  int64_t row_tiles, col_tiles;  // over N and K of the [N, K] output of each (b, g)
  __device__ bool get(int64_t t, Problem* out, int64_t* r0, int64_t* c0) const {
    *c0 = t % col_tiles * kTileN;
    t /= col_tiles;
    *r0 = t % row_tiles * kTileM;
    t /= row_tiles;
    const int64_t g = t % op.groups, b = t / op.groups;
    int64_t t0, t1;
    group_rows(op.sizes + b * op.groups, g, op.t, &t0, &t1);
    *out = op.problem(b, g, t0, t1);  // an empty [t0, t1) still stores c or zeros
    return true;
  }
};

// Three CTAs per SM caps registers at 80, which ptxas meets without spilling (-Xptxas -v).
template <typename Tiles>
__global__ void __launch_bounds__(kThreads, 3)
    portable_gemm_kernel(Tiles tiles, int64_t num_tiles, Fp8Format fa, Fp8Format fb) {
  __shared__ Smem s;
  // The tile's Problem lives in shared memory: one thread maps the tile (the contiguous
  // walk reads up to G sizes), and the CTA reads fields when it needs them instead of
  // keeping ~20 64-bit values in registers through the main loop. Raw storage because a
  // __shared__ variable cannot have Problem's default member initializers.
  __shared__ alignas(Problem) unsigned char task_storage[sizeof(Problem)];
  __shared__ int64_t task_r0, task_c0;
  __shared__ bool task_valid;
  Problem& task = *reinterpret_cast<Problem*>(task_storage);
  s.lut_a[threadIdx.x] = fp8_to_float(static_cast<uint8_t>(threadIdx.x), fa);
  s.lut_b[threadIdx.x] = fp8_to_float(static_cast<uint8_t>(threadIdx.x), fb);
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    __syncthreads();  // the previous tile's readers of `task` are done
    if (threadIdx.x == 0) task_valid = tiles.get(t, &task, &task_r0, &task_c0);
    __syncthreads();  // also publishes the LUTs on the first iteration
    if (task_valid) gemm_tile(task, task_r0, task_c0, s);
  }
}

template <typename Tiles>
ffi::Error launch_gemm(cudaStream_t stream, const Tiles& tiles, int64_t num_tiles, Fp8Format fa,
                       Fp8Format fb) {
  if (num_tiles <= 0) return ffi::Error::Success();
  portable_gemm_kernel<Tiles><<<grid_for(num_tiles), kThreads, 0, stream>>>(tiles, num_tiles,
                                                                             fa, fb);
  return launch_status("portable_gemm_kernel");
}

// ---------------------------------------------------------------------------------------
// Handlers.

ffi::Error GemmImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer sa,
                    ffi::AnyBuffer sb, std::optional<ffi::AnyBuffer> c,
                    ffi::Result<ffi::AnyBuffer> out, int64_t scale_mode, int64_t block_size) {
  Problem p;
  FP8GEMM_RETURN_IF_ERROR(DecodeGemm(a, b, sa, sb, c, out, scale_mode, block_size, &p));
  ffi::Error status;
  if (sm90::gemm(p, static_cast<ScaleMode>(scale_mode), stream, &status)) return status;
  const int64_t col_tiles = ceil_div(p.cols, kTileN);
  return launch_gemm(stream, DenseTiles{p, col_tiles}, ceil_div(p.rows, kTileM) * col_tiles,
                     p.a.format, p.b.format);
}

ffi::Error Grouped(cudaStream_t stream, bool masked, ffi::AnyBuffer x, ffi::AnyBuffer sizes,
                   ffi::AnyBuffer w, ffi::AnyBuffer sx, ffi::AnyBuffer sw,
                   ffi::Result<ffi::AnyBuffer> out, int64_t scale_mode, int64_t block_size) {
  GroupedOp op;
  FP8GEMM_RETURN_IF_ERROR(
      DecodeGrouped(masked, x, sizes, w, sx, sw, out, scale_mode, block_size, &op));
  // Rows outside every group are zeros; the kernel writes only rows inside groups.
  const size_t bytes = static_cast<size_t>(op.batch * op.rows_per_batch() * op.n) *
                       (op.out_type == OutType::kF32 ? 4 : 2);
  if (bytes > 0) {
    FP8GEMM_RETURN_IF_ERROR(
        cuda_status(cudaMemsetAsync(op.out, 0, bytes, stream), "grouped output memset"));
  }
  ffi::Error status;
  if (sm90::grouped(op, stream, &status)) return status;
  const int64_t col_tiles = ceil_div(op.n, kTileN);
  if (masked) {
    const int64_t row_tiles = ceil_div(op.m, kTileM);
    return launch_gemm(stream, MaskedTiles{op, row_tiles, col_tiles},
                       op.batch * op.groups * row_tiles * col_tiles, op.fx, op.fw);
  }
  const int64_t slots = ceil_div(op.m, kTileM) + op.groups;
  return launch_gemm(stream, ContiguousTiles{op, slots, col_tiles},
                     op.batch * slots * col_tiles, op.fx, op.fw);
}

ffi::Error GroupedContiguousImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer sizes,
                                 ffi::AnyBuffer w, ffi::AnyBuffer sx, ffi::AnyBuffer sw,
                                 ffi::Result<ffi::AnyBuffer> out, int64_t scale_mode,
                                 int64_t block_size) {
  return Grouped(stream, false, x, sizes, w, sx, sw, out, scale_mode, block_size);
}

ffi::Error GroupedMaskedImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer sizes,
                             ffi::AnyBuffer w, ffi::AnyBuffer sx, ffi::AnyBuffer sw,
                             ffi::Result<ffi::AnyBuffer> out, int64_t scale_mode,
                             int64_t block_size) {
  return Grouped(stream, true, x, sizes, w, sx, sw, out, scale_mode, block_size);
}

ffi::Error GroupedKGroupedImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b,
                               ffi::AnyBuffer sizes, ffi::AnyBuffer sa, ffi::AnyBuffer sb,
                               std::optional<ffi::AnyBuffer> c,
                               ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  KGroupedOp op;
  FP8GEMM_RETURN_IF_ERROR(DecodeKGrouped(a, b, sizes, sa, sb, c, out, block_size, &op));
  ffi::Error status;
  if (sm90::kgrouped(op, stream, &status)) return status;
  const int64_t row_tiles = ceil_div(op.n, kTileM), col_tiles = ceil_div(op.k, kTileN);
  return launch_gemm(stream, KGroupedTiles{op, row_tiles, col_tiles},
                     op.batch * op.groups * row_tiles * col_tiles, op.fa, op.fb);
}

}  // namespace
}  // namespace fp8gemm::cuda

namespace ffi = xla::ffi;

#define FP8GEMM_BIND ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_gemm_cuda, fp8gemm::cuda::GemmImpl,
                              FP8GEMM_BIND_GEMM(FP8GEMM_BIND),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_grouped_contiguous_cuda, fp8gemm::cuda::GroupedContiguousImpl,
                              FP8GEMM_BIND_GROUPED(FP8GEMM_BIND),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_grouped_masked_cuda, fp8gemm::cuda::GroupedMaskedImpl,
                              FP8GEMM_BIND_GROUPED(FP8GEMM_BIND),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_grouped_kgrouped_cuda, fp8gemm::cuda::GroupedKGroupedImpl,
                              FP8GEMM_BIND_KGROUPED(FP8GEMM_BIND),
                              {ffi::Traits::kCmdBufferCompatible});
