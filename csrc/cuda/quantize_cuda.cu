// CUDA backend of the quantization primitives (per-tensor, blockwise, and both 1 x block
// layouts at once); computes exactly the function of cpu/quantize_cpu.cc, on any GPU.
//
// Bitwise agreement with the CPU: the amax is a max (exact in any order), the scale and its
// inverse are the same float expressions (fp8.h), q = to_fp8(x * inverse) rounds like
// fp8.h's float_to_fp8 (in hardware on GPUs with FP8); nvcc's default -prec-div=true
// -ftz=false keep the arithmetic IEEE (this file must never be built with --use_fast_math).
//
// Per-tensor (x [G, L]): a row's amax must be final before any of its values is cast, and
// there is no scratch buffer, so the call is a memset and three launches on the stream:
//   1. portable_amax_kernel: each CTA reduces the bits of |x| (cuda_utils.cuh: their
//      unsigned max is the NaN-propagating amax) over part of row g and atomicMax-es them
//      into the zeroed scale[g], which holds amax bits until step 3;
//   2. portable_cast_tensor_kernel: q = fp8(x * inverse(amax[g])), walking x backwards so
//      that it starts on what the amax pass left in L2;
//   3. portable_scale_kernel: one thread per row turns the amax bits into the scale, in place.
// Blockwise (nothing crosses blocks), the fastest kernel that applies (DESIGN.md: they are
// bound by instructions as much as by bytes):
//   * portable_quantize_rows_kernel: 1 x block along rows that are whole blocks (activations
//     and gradients): one vector load and store per lane and block, 8 blocks per warp;
//   * portable_quantize_tile_kernel: blocks of 64 and 128 transposed, square, or both 1 x
//     block layouts at once (quantize_dual), from block x block tiles staged in shared
//     memory, so that reads and writes both run along the contiguous axes; whole tiles and
//     edge tiles in separate launches;
//   * portable_quantize_cols_kernel: transposed blocks of 256;
//   * portable_quantize_block_kernel: everything else (one warp per 1 x block block, one
//     CTA per block x block block).
#include "../common/ops.h"
#include "../common/bindings.h"
#include "../handlers.h"
#include "cuda_utils.cuh"

namespace fp8gemm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;  // accesses per thread per task of the per-tensor kernels
constexpr int64_t kChunk = int64_t{kThreads} * kItems;  // accesses per task
static_assert(kThreads % 32 == 0, "kernels reduce per warp: whole warps only");

// ---------------------------------------------------------------------------------------
// Per-tensor. A task is kThreads * kItems accesses of kN values each, all in one row (so a
// task's amax goes to one scale, with one atomic per CTA). kN is 16 bytes of values when
// rows are whole 16-byte vectors and x is aligned, else 1.

template <InType T, int kN>
struct Vec {
  using Elem = std::conditional_t<T == InType::kF32, float, uint16_t>;
  struct alignas(kN * sizeof(Elem)) Type {
    Elem v[kN];
  };
};

template <InType T, int kN>
__global__ void __launch_bounds__(kThreads)
    portable_amax_kernel(const void* x, uint32_t* amax_bits, int64_t length, int64_t chunks,
                         int64_t tasks) {
  using V = typename Vec<T, kN>::Type;
  __shared__ uint32_t warp_amax[kWarps];
  const int64_t accesses = length / kN;  // per row
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t g = task / chunks;
    const int64_t begin = (task % chunks) * kChunk;
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = begin + j * kThreads + threadIdx.x;
      if (i < accesses) {
        const V v = static_cast<const V*>(x)[g * accesses + i];
#pragma unroll
        for (int t = 0; t < kN; ++t) m = umax(m, abs_bits(load_input<T>(v.v, t)));
      }
    }
    m = warp_max(m);
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 0; w < kWarps; ++w) m = umax(m, warp_amax[w]);
      if (m != 0) atomicMax(amax_bits + g, m);
    }
    __syncthreads();  // warp_amax is read before the next task writes it
  }
}

// Reads and writes through uint32_t* only: the buffer changes meaning from amax bits to
// the float scale here.
__global__ void __launch_bounds__(kThreads)
    portable_scale_kernel(uint32_t* scale_bits, int64_t groups, Fp8Format format) {
  for (int64_t g = int64_t{blockIdx.x} * kThreads + threadIdx.x; g < groups;
       g += int64_t{gridDim.x} * kThreads) {
    scale_bits[g] = float_to_bits(scale_from_amax(bits_to_float(scale_bits[g]), format));
  }
}

template <InType T, int kN>
__global__ void __launch_bounds__(kThreads)
    portable_cast_tensor_kernel(const void* x, const uint32_t* amax_bits, uint8_t* q,
                                int64_t length, int64_t chunks, int64_t tasks, Fp8Format format) {
  using V = typename Vec<T, kN>::Type;
  struct alignas(kN) Bytes {
    uint8_t v[kN];
  };
  const int64_t accesses = length / kN;  // per row
  for (int64_t n = blockIdx.x; n < tasks; n += gridDim.x) {
    // Backwards: the amax pass read x forwards, so its last tens of MB are still in L2.
    const int64_t task = tasks - 1 - n;
    const int64_t g = task / chunks;
    const int64_t begin = (task % chunks) * kChunk;
    const float inv = inverse_scale_from_amax(bits_to_float(amax_bits[g]), format);
#pragma unroll 4
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = begin + j * kThreads + threadIdx.x;
      if (i < accesses) {
        const V v = static_cast<const V*>(x)[g * accesses + i];
        Bytes out;
#pragma unroll
        for (int t = 0; t < kN; ++t) out.v[t] = to_fp8(load_input<T>(v.v, t) * inv, format);
        reinterpret_cast<Bytes*>(q)[g * accesses + i] = out;
      }
    }
  }
}

template <InType T, int kN>
ffi::Error launch_quantize_tensor(cudaStream_t stream, const QuantizeTensorOp& op) {
  uint32_t* amax_bits = reinterpret_cast<uint32_t*>(op.scale);
  const int64_t chunks = ceil_div(op.length / kN, kChunk);
  const int64_t tasks = op.groups * chunks;
  if (tasks > 0) {
    portable_amax_kernel<T, kN><<<grid_for(tasks), kThreads, 0, stream>>>(
        op.x, amax_bits, op.length, chunks, tasks);
    FP8GEMM_RETURN_IF_ERROR(launch_status("portable_amax_kernel"));
    portable_cast_tensor_kernel<T, kN><<<grid_for(tasks), kThreads, 0, stream>>>(
        op.x, amax_bits, op.q, op.length, chunks, tasks, op.format);
    FP8GEMM_RETURN_IF_ERROR(launch_status("portable_cast_tensor_kernel"));
  }
  portable_scale_kernel<<<grid_for(ceil_div(op.groups, kThreads)), kThreads, 0, stream>>>(
      amax_bits, op.groups, op.format);
  return launch_status("portable_scale_kernel");
}

ffi::Error QuantizeTensorImpl(cudaStream_t stream, ffi::AnyBuffer x,
                              ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> scale) {
  QuantizeTensorOp op;
  FP8GEMM_RETURN_IF_ERROR(DecodeQuantizeTensor(x, q, scale, &op));
  if (op.groups == 0) return ffi::Error::Success();
  // Zero bits = amax 0: the value of an empty row, and the identity of the max.
  FP8GEMM_RETURN_IF_ERROR(cuda_status(
      cudaMemsetAsync(op.scale, 0, op.groups * sizeof(uint32_t), stream), "scale memset"));
  return dispatch_input(op.x_type, [&](auto tag) -> ffi::Error {
    constexpr InType T = decltype(tag)::value;
    constexpr int kVector = T == InType::kF32 ? 4 : 8;  // 16 bytes
    const auto aligned = [](const void* p, int n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
    if (op.length % kVector == 0 && aligned(op.x, 16) && aligned(op.q, kVector)) {
      return launch_quantize_tensor<T, kVector>(stream, op);
    }
    return launch_quantize_tensor<T, 1>(stream, op);
  });
}

// ---------------------------------------------------------------------------------------
// Blockwise.

struct BlockArgs {
  const void* x;
  uint8_t* q;
  float* scales;
  Fp8Format format;
  int64_t rows, cols;          // of x, per batch entry
  int64_t out_rows, out_cols;  // of q, per batch entry
  int64_t scale_rows, scale_cols;
  int64_t block_rows, block_cols;
  bool transpose;
  int64_t tasks;  // scale blocks: batch * scale_rows * scale_cols
};

// kGroupWarps warps quantize one scale block: 1 for 1 x block (at most 256 values, 8 per
// lane; no __syncthreads, so warps of a CTA run independent tasks), kWarps (the whole CTA)
// for block x block (up to 65536 values).
template <InType T, int kGroupWarps>
__global__ void __launch_bounds__(kThreads) portable_quantize_block_kernel(BlockArgs a) {
  static_assert(kGroupWarps == 1 || kGroupWarps == kWarps,
                "a scale block is handled by one warp or by the whole CTA");
  constexpr int kGroupThreads = kGroupWarps * 32;
  constexpr int kGroupsPerCta = kThreads / kGroupThreads;
  __shared__ uint32_t warp_amax[kWarps];
  const int lane = threadIdx.x % kGroupThreads;
  const int64_t first = int64_t{blockIdx.x} * kGroupsPerCta + threadIdx.x / kGroupThreads;
  // Uniform over the group (and over the CTA when kGroupWarps == kWarps, as the barriers
  // below need).
  for (int64_t task = first; task < a.tasks; task += int64_t{gridDim.x} * kGroupsPerCta) {
    const int64_t per_batch = a.scale_rows * a.scale_cols;
    const int64_t b = task / per_batch;
    const int64_t r0 = (task % per_batch) / a.scale_cols * a.block_rows;
    const int64_t c0 = task % a.scale_cols * a.block_cols;
    const int nr = static_cast<int>(min(a.block_rows, a.out_rows - r0));
    const int nc = static_cast<int>(min(a.block_cols, a.out_cols - c0));
    const int n = nr * nc;
    // Element e of the block as (row, col) of the output; a transposed block walks the
    // output rows fastest, which is x's contiguous axis, so its reads stay coalesced.
    auto out_rc = [&](int e, int64_t* r, int64_t* c) {
      *r = r0 + (a.transpose ? e % nr : e / nc);
      *c = c0 + (a.transpose ? e / nr : e % nc);
    };
    auto src = [&](int64_t r, int64_t c) {
      return b * a.rows * a.cols + (a.transpose ? c * a.cols + r : r * a.cols + c);
    };

    uint32_t m = 0;
    for (int e = lane; e < n; e += kGroupThreads) {
      int64_t r, c;
      out_rc(e, &r, &c);
      m = umax(m, abs_bits(load_input<T>(a.x, src(r, c))));
    }
    m = warp_max(m);
    if constexpr (kGroupWarps > 1) {
      if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = m;
      __syncthreads();
      for (int w = 0; w < kGroupWarps; ++w) m = umax(m, warp_amax[w]);
      __syncthreads();  // every thread has read warp_amax before the next task rewrites it
    }

    const float amax = bits_to_float(m);
    const float s = scale_from_amax(amax, a.format);
    const float inv = inverse_scale_from_amax(amax, a.format);
    if (lane == 0) a.scales[task] = s;  // task == (b * scale_rows + sr) * scale_cols + sc
    for (int e = lane; e < n; e += kGroupThreads) {
      int64_t r, c;
      out_rc(e, &r, &c);
      a.q[(b * a.out_rows + r) * a.out_cols + c] =
          to_fp8(load_input<T>(a.x, src(r, c)) * inv, a.format);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Blockwise: helpers of the rows and tile kernels.

// The blockwise kernels hold x as 32-bit words: one float, or two 16-bit values (value 2i
// in the low half of word i, as in memory). Words<T> reads values and reduces magnitudes a
// word at a time: a magnitude is the value's bits with the sign cleared, which order like |value|
// (every NaN above inf, the convention of abs_bits), so for 16-bit inputs one per-halfword
// unsigned max (__vmaxu2, one instruction on Hopper) is the amax of two values.
template <InType T>
struct Words {
  static constexpr int kValues = T == InType::kF32 ? 1 : 2;  // per word
  __device__ static uint32_t magnitudes(uint32_t w) {
    return w & (T == InType::kF32 ? 0x7fffffffu : 0x7fff7fffu);
  }
  __device__ static uint32_t max(uint32_t a, uint32_t b) {
    if constexpr (T == InType::kF32) return umax(a, b);
    else return __vmaxu2(a, b);
  }
  // Value h of word w, as a float.
  __device__ static float value(uint32_t w, int h) {
    if constexpr (T == InType::kF32) return bits_to_float(w);
    if constexpr (T == InType::kBF16) return bits_to_float(h ? w & 0xffff0000u : w << 16);
    if constexpr (T == InType::kF16) {
      return f16_bits_to_float(static_cast<uint16_t>(h ? w >> 16 : w));
    }
  }
  // Value j of a word array.
  template <int N>
  __device__ static float value(const uint32_t (&w)[N], int j) {
    return value(w[j / kValues], j % kValues);
  }
  // The amax bits (abs_bits) of a magnitudes word m's value h, and of all its values.
  __device__ static uint32_t amax_bits(uint32_t m, int h) { return float_to_bits(value(m, h)); }
  __device__ static uint32_t amax_bits(uint32_t m) {
    return kValues == 1 ? amax_bits(m, 0) : umax(amax_bits(m, 0), amax_bits(m, 1));
  }
  // The amax bits of all values of a word array.
  template <int N>
  __device__ static uint32_t amax_bits(const uint32_t (&w)[N]) {
    uint32_t m = magnitudes(w[0]);
#pragma unroll
    for (int u = 1; u < N; ++u) m = max(m, magnitudes(w[u]));
    return amax_bits(m);
  }
  // The values of a word array times inv, as FP8 pairs (to_fp8x2): pair t holds values 2 t
  // and 2 t + 1.
  template <int N, int kPairs>
  __device__ static void to_fp8_pairs(const uint32_t (&w)[N], float inv, Fp8Format format,
                                      uint16_t (&out)[kPairs]) {
    static_assert(2 * kPairs == N * kValues, "a pair for every two values");
#pragma unroll
    for (int t = 0; t < kPairs; ++t) {
      out[t] = to_fp8x2(value(w, 2 * t) * inv, value(w, 2 * t + 1) * inv, format);
    }
  }
};

// Stores the 2 * kPairs FP8 values p (pairs from to_fp8x2) at out[0, n): one vector store
// when all fit and out is aligned, which kAligned (whole tiles) guarantees.
template <int kPairs, bool kAligned>
__device__ __forceinline__ void store_pairs(uint8_t* out, const uint16_t (&p)[kPairs], int n) {
  struct alignas(2 * kPairs) Pairs {
    uint16_t p[kPairs];
  };
  if (kAligned || (n >= 2 * kPairs && reinterpret_cast<uintptr_t>(out) % (2 * kPairs) == 0)) {
    Pairs v;
#pragma unroll
    for (int t = 0; t < kPairs; ++t) v.p[t] = p[t];
    *reinterpret_cast<Pairs*>(out) = v;
  } else {
#pragma unroll
    for (int t = 0; t < 2 * kPairs; ++t) {
      if (t < n) out[t] = static_cast<uint8_t>(p[t / 2] >> t % 2 * 8);
    }
  }
}

// Line lane's scale and inverse scale, for the kLines lines (1 x block blocks) that a warp
// quantizes together, from m[i], each lane's amax bits over its values of line i (lanes
// from kLines on get line 0's, unused). Lane i computes line i's two IEEE divisions, so a
// line costs one division pair spread over the warp instead of one on every lane, and the
// kLines reductions are independent of each other. Line i's inverse is then
// __shfl_sync(~0u, inverse, i).
struct LineScale {
  float scale, inverse;
};

template <int kLines>
__device__ __forceinline__ LineScale line_scales(const uint32_t (&m)[kLines], Fp8Format f) {
  static_assert(kLines <= 32, "a line per lane");
  const int lane = threadIdx.x % 32;
  uint32_t mine = 0;
#pragma unroll
  for (int i = 0; i < kLines; ++i) {
    const uint32_t line = warp_max(m[i]);
    if (lane == i || i == 0) mine = line;
  }
  const float amax = bits_to_float(mine);
  return {scale_from_amax(amax, f), inverse_scale_from_amax(amax, f)};
}

// 1 x kBlock scales along x's rows, not transposed, every row a whole number of blocks: the
// blocks are consecutive kBlock-value runs of the flat array, scale b belongs to run b. A
// warp quantizes kLines consecutive runs at a time, kBlock / 32 values per lane of each,
// read and written as one vector each: all kLines loads in flight before the reductions,
// and lane i computing run i's scale (line_scales).
constexpr int kRunsPerWarp = 8;

template <InType T, int kBlock>
__global__ void __launch_bounds__(kThreads)
    portable_quantize_rows_kernel(const void* x, uint8_t* q, float* scales, int64_t blocks,
                                  Fp8Format format) {
  using W = Words<T>;
  constexpr int kLines = kRunsPerWarp;
  constexpr int kValues = kBlock / 32;  // per lane and run
  constexpr int kWords = kValues / W::kValues;
  struct alignas(kWords * 4) In {
    uint32_t w[kWords];
  };
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t{gridDim.x} * kWarps;
  const int64_t groups = ceil_div(blocks, int64_t{kLines});
  for (int64_t g = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32; g < groups; g += warps) {
    const int64_t b0 = g * kLines;
    In in[kLines];
    uint32_t m[kLines];
#pragma unroll
    for (int i = 0; i < kLines; ++i) {
      in[i] = b0 + i < blocks ? static_cast<const In*>(x)[(b0 + i) * 32 + lane] : In{};
    }
#pragma unroll
    for (int i = 0; i < kLines; ++i) m[i] = W::amax_bits(in[i].w);
    const LineScale ls = line_scales(m, format);
    if (lane < kLines && b0 + lane < blocks) scales[b0 + lane] = ls.scale;
#pragma unroll
    for (int i = 0; i < kLines; ++i) {
      const float inv = __shfl_sync(0xffffffffu, ls.inverse, i);
      uint16_t out[kValues / 2];
      W::to_fp8_pairs(in[i].w, inv, format, out);
      if (b0 + i < blocks) {
        store_pairs<kValues / 2, true>(q + ((b0 + i) * 32 + lane) * kValues, out, kValues);
      }
    }
  }
}

// 1 x kBlock scales along x's columns, transposed, for blocks of 256 (the tiled kernel below
// takes 64 and 128) (x [rows, cols] -> q [cols, rows], the
// weight gradient's operands): output row c is x's column c, quantized in blocks of kBlock
// of x's rows. A CTA stages a tile of kBlock x-rows by kTileCols x-columns in shared
// memory with coalesced row reads, each warp reduces and writes kTileCols / kWarps output
// rows (four bytes per lane per store), so that both x and q are accessed along their
// contiguous axes. Tails (rows past `rows`, columns past `cols`) are masked.
constexpr int kTileCols = 32;

template <InType T, int kBlock>
__global__ void __launch_bounds__(kThreads) portable_quantize_cols_kernel(BlockArgs a) {
  static_assert(kBlock % 128 == 0 || kBlock == 64, "four values per lane per store");
  constexpr int kColsPerWarp = kTileCols / kWarps;
  __shared__ float tile[kBlock][kTileCols + 1];  // odd pitch: column reads hit distinct banks
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row_tiles = a.scale_cols;  // = ceil(rows / kBlock)
  const int64_t col_tiles = ceil_div(a.cols, int64_t{kTileCols});
  for (int64_t task = blockIdx.x; task < a.tasks; task += gridDim.x) {
    const int64_t b = task / (row_tiles * col_tiles);
    const int64_t rt = task / col_tiles % row_tiles, ct = task % col_tiles;
    const int64_t r0 = rt * kBlock, c0 = ct * kTileCols;
    __syncthreads();  // the previous task's readers of `tile` are done
    for (int rr = warp; rr < kBlock; rr += kWarps) {
      const int64_t r = r0 + rr, c = c0 + lane;
      tile[rr][lane] = (r < a.rows && c < a.cols)
                           ? load_input<T>(a.x, (b * a.rows + r) * a.cols + c)
                           : 0.0f;  // |0| never raises an amax
    }
    __syncthreads();
#pragma unroll
    for (int j = warp * kColsPerWarp; j < (warp + 1) * kColsPerWarp; ++j) {
      const int64_t c = c0 + j;  // the output row
      if (c >= a.cols) break;    // uniform over the warp
      uint32_t m = 0;
#pragma unroll
      for (int rr = lane; rr < kBlock; rr += 32) m = umax(m, abs_bits(tile[rr][j]));
      const float amax = bits_to_float(warp_max(m));
      const float s = scale_from_amax(amax, a.format);
      const float inv = inverse_scale_from_amax(amax, a.format);
      if (lane == 0) a.scales[(b * a.out_rows + c) * a.scale_cols + rt] = s;
      uint8_t* out = a.q + (b * a.out_rows + c) * a.out_cols + r0;
      for (int e = 4 * lane; e < kBlock; e += 128) {
        uint8_t v[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) v[t] = to_fp8(tile[e + t][j] * inv, a.format);
        const int64_t valid = a.rows - (r0 + e);  // output columns left in this row
        if (valid >= 4 && a.out_cols % 4 == 0) {
          *reinterpret_cast<uint32_t*>(out + e) =
              v[0] | (v[1] << 8) | (v[2] << 16) | (uint32_t{v[3]} << 24);
        } else {
          for (int t = 0; t < 4 && t < valid; ++t) out[e + t] = v[t];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tiled: a CTA stages a kBlock x kBlock tile of x in shared memory (cp.async, the whole
// tile in flight at once and no registers held for it) and writes from there any of
//   kOutRows    q [B, R, C], 1 x kBlock blocks along x's rows,
//   kOutCols    qt [B, C, R], x transposed, 1 x kBlock blocks along x's columns,
//   kOutSquare  q [B, R, C], one kBlock x kBlock block per tile (weights).
// kOutRows | kOutCols is quantize_fp8_with_transpose: both layouts training needs of an
// activation or output gradient, from one read of x.
//
// Rows: warp w takes tile rows w, w + kWarps, ...; a lane's piece of kBlock / 32 values is
// one shared-memory vector, the row's block reduces across the warp. Cols: warp w takes
// 16-byte chunk columns w, w + kWarps, ...; lane l holds rows [l * kSpan, (l + 1) * kSpan)
// of its chunk's columns, so a column's block reduces across the warp and each lane writes
// kSpan consecutive bytes of the transposed row. Square: every thread scans its chunks,
// the CTA reduces. The tile is stored in 16-byte chunks, chunk k of row r at
// k ^ ((r / kSpan) % 8): a row's accesses touch a whole row (a permutation of it is
// conflict-free) and each quarter-warp of column reads (lanes l..l+7, rows l * kSpan + t)
// hits eight distinct 16-byte bank groups.
enum TileOut : int { kOutRows = 1, kOutCols = 2, kOutSquare = 4 };

template <InType T, int kBlock>
struct TileLayout {
  using Elem = std::conditional_t<T == InType::kF32, float, uint16_t>;
  static constexpr int kChunkValues = 16 / sizeof(Elem);
  static constexpr int kChunks = kBlock / kChunkValues;  // per tile row
  static constexpr int kSpan = kBlock / 32;              // per lane: values (rows), rows (cols)
  static constexpr size_t kSmem = size_t{kBlock} * kBlock * sizeof(Elem);
  static_assert(kChunks % 8 == 0 && kSpan * sizeof(Elem) <= 16 && kSpan % 2 == 0, "tile layout");
  struct alignas(16) Chunk {
    uint32_t w[4];
  };
  static constexpr int kPieceWords = kSpan * sizeof(Elem) / 4;
  struct alignas(kPieceWords * 4) Piece {  // a lane's kSpan values of a tile row
    uint32_t w[kPieceWords];
  };
  __device__ static int chunk_at(int r, int k) { return r * kChunks + (k ^ (r / kSpan % 8)); }
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

struct TileArgs {
  const void* x;
  uint8_t *q, *qt;             // q: rows or square output; qt: the transposed output
  float *scales, *scales_t;
  Fp8Format format;
  int64_t batch, rows, cols;   // of x
  int64_t row_tiles, col_tiles;  // ceil(rows / block), ceil(cols / block)
  bool x_vectors;  // x's rows are whole 16-byte chunks: x aligned, cols a multiple of them
  bool aligned;    // x_vectors, rows and cols multiples of 8, q and qt 16-byte aligned
  int64_t whole_rt, whole_ct;  // tiles [0, whole_rt) x [0, whole_ct) are whole (aligned)
};

// Quantizes the tile (b, rt, ct) into the kOut layouts. Whole tiles (kWhole: inside x, and
// a.aligned) take no bounds checks and only vector stores; edge tiles check every line and
// value against rows_left x cols_left, and past those the staged tile holds zeros, which
// never raise an amax and are never written out.
template <InType T, int kBlock, int kOut, bool kWhole>
__device__ __forceinline__ void quantize_tile(const TileArgs& a,
                                              typename TileLayout<T, kBlock>::Chunk* tile,
                                              uint32_t* warp_amax, int64_t b, int64_t rt,
                                              int64_t ct) {
  using L = TileLayout<T, kBlock>;
  using W = Words<T>;
  using Elem = typename L::Elem;
  using Chunk = typename L::Chunk;
  constexpr int kSpan = L::kSpan, kCV = L::kChunkValues;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r0 = rt * kBlock, c0 = ct * kBlock;
  const int rows_left = kWhole ? kBlock : static_cast<int>(std::min<int64_t>(a.rows - r0, kBlock));
  const int cols_left = kWhole ? kBlock : static_cast<int>(std::min<int64_t>(a.cols - c0, kBlock));

  // Stage the tile: cp.async where whole chunks are in bounds.
  const Elem* x_tile = static_cast<const Elem*>(a.x) + (b * a.rows + r0) * a.cols + c0;
  for (int i = threadIdx.x; i < kBlock * L::kChunks; i += kThreads) {
    const int rr = i / L::kChunks, k = i % L::kChunks;
    const Elem* src = x_tile + rr * a.cols + k * kCV;
    Chunk* dst = tile + L::chunk_at(rr, k);
    if (kWhole || (a.x_vectors && rr < rows_left && (k + 1) * kCV <= cols_left)) {
      cp_async_16(dst, src);
    } else {
      Elem v[kCV];
#pragma unroll
      for (int t = 0; t < kCV; ++t) {
        v[t] = rr < rows_left && k * kCV + t < cols_left ? src[t] : Elem{0};
      }
      memcpy(dst, v, sizeof(v));
    }
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();

  if constexpr ((kOut & kOutRows) != 0) {
    // kLines rows at a time, lane i computing row i's scale (line_scales); the lane holds
    // values [lane * kSpan, (lane + 1) * kSpan) of each.
    constexpr int kLines = 8;
    static_assert(kBlock % (kLines * kWarps) == 0, "whole batches of rows per warp");
    using Piece = typename L::Piece;
    const int k = lane * kSpan / kCV, word = lane * kSpan % kCV / W::kValues;
    const int col = lane * kSpan;
    uint8_t* q_tile = a.q + (b * a.rows + r0) * a.cols + c0 + col;
    float* s_tile = a.scales + (b * a.rows + r0) * a.col_tiles + ct;
    for (int rr0 = warp * kLines; rr0 < rows_left; rr0 += kWarps * kLines) {
      Piece in[kLines];
      uint32_t m[kLines];
#pragma unroll
      for (int i = 0; i < kLines; ++i) {
        in[i] = *reinterpret_cast<const Piece*>(tile[L::chunk_at(rr0 + i, k)].w + word);
        m[i] = W::amax_bits(in[i].w);
      }
      const LineScale ls = line_scales(m, a.format);
      if (lane < kLines && (kWhole || rr0 + lane < rows_left)) {
        s_tile[(rr0 + lane) * a.col_tiles] = ls.scale;
      }
#pragma unroll
      for (int i = 0; i < kLines; ++i) {
        const float inv = __shfl_sync(0xffffffffu, ls.inverse, i);
        uint16_t out[kSpan / 2];
        W::to_fp8_pairs(in[i].w, inv, a.format, out);
        if (kWhole || (rr0 + i < rows_left && col < cols_left)) {
          store_pairs<kSpan / 2, kWhole>(q_tile + (rr0 + i) * a.cols, out, cols_left - col);
        }
      }
    }
  }

  if constexpr ((kOut & kOutCols) != 0) {
    // A warp takes a chunk column k at a time: its kCV output rows, lane i computing output
    // row i's scale (line_scales); the lane holds tile rows [lane * kSpan, (lane + 1) * kSpan)
    // of the chunk column, output columns of each output row.
    const int row = lane * kSpan;
    uint8_t* qt_tile = a.qt + (b * a.cols + c0) * a.rows + r0 + row;
    float* st_tile = a.scales_t + (b * a.cols + c0) * a.row_tiles + rt;
    const int chunks_left = kWhole ? L::kChunks : ceil_div(cols_left, kCV);
    for (int k = warp; k < chunks_left; k += kWarps) {
      Chunk in[kSpan];
#pragma unroll
      for (int t = 0; t < kSpan; ++t) in[t] = tile[L::chunk_at(row + t, k)];
      uint32_t m[kCV];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        uint32_t mw = W::magnitudes(in[0].w[u]);
#pragma unroll
        for (int t = 1; t < kSpan; ++t) mw = W::max(mw, W::magnitudes(in[t].w[u]));
#pragma unroll
        for (int h = 0; h < W::kValues; ++h) m[u * W::kValues + h] = W::amax_bits(mw, h);
      }
      const LineScale ls = line_scales(m, a.format);
      if (lane < kCV && (kWhole || k * kCV + lane < cols_left)) {
        st_tile[(k * kCV + lane) * a.row_tiles] = ls.scale;
      }
#pragma unroll
      for (int j = 0; j < kCV; ++j) {
        const int c = k * kCV + j;  // the output row, in the tile
        const float inv = __shfl_sync(0xffffffffu, ls.inverse, j);
        uint16_t out[kSpan / 2];
#pragma unroll
        for (int t = 0; t < kSpan / 2; ++t) {
          out[t] = to_fp8x2(W::value(in[2 * t].w, j) * inv, W::value(in[2 * t + 1].w, j) * inv,
                            a.format);
        }
        if (kWhole || (c < cols_left && row < rows_left)) {
          store_pairs<kSpan / 2, kWhole>(qt_tile + c * a.rows, out, rows_left - row);
        }
      }
    }
  }

  if constexpr ((kOut & kOutSquare) != 0) {
    uint32_t mw = 0;
    for (int i = threadIdx.x; i < kBlock * L::kChunks; i += kThreads) {
      const Chunk in = tile[L::chunk_at(i / L::kChunks, i % L::kChunks)];
#pragma unroll
      for (int u = 0; u < 4; ++u) mw = W::max(mw, W::magnitudes(in.w[u]));
    }
    uint32_t m = warp_max(W::amax_bits(mw));
    if (lane == 0) warp_amax[warp] = m;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = umax(m, warp_amax[w]);
    const float amax = bits_to_float(m);
    const float s = scale_from_amax(amax, a.format);
    const float inv = inverse_scale_from_amax(amax, a.format);
    if (threadIdx.x == 0) a.scales[(b * a.row_tiles + rt) * a.col_tiles + ct] = s;
    uint8_t* q_tile = a.q + (b * a.rows + r0) * a.cols + c0;
    for (int i = threadIdx.x; i < kBlock * L::kChunks; i += kThreads) {
      const int rr = i / L::kChunks, col = i % L::kChunks * kCV;
      if (!kWhole && (rr >= rows_left || col >= cols_left)) continue;
      const Chunk in = tile[L::chunk_at(rr, i % L::kChunks)];
      uint16_t out[kCV / 2];
      W::to_fp8_pairs(in.w, inv, a.format, out);
      store_pairs<kCV / 2, kWhole>(q_tile + rr * a.cols + col, out, cols_left - col);
    }
  }
}

// Whole tiles: a CTA per tile, (blockIdx.x, y, z) = (column tile, row tile, batch) with
// grid-stride loops, so no division; at least 4 CTAs (16-bit inputs: 32 KB tiles) or 3
// (float32: 64 KB) per SM. One tile per CTA at a time (a double-buffered persistent version
// measured slower: the CTAs resident on an SM already overlap one's loads with another's
// math). Edge tiles (the partial last tile row and column, or every tile of an unaligned
// input) have a launch of their own, so that their bounds checks take no registers from
// the whole tiles' kernel: edge tile e of the whole_rt x (col_tiles - whole_ct) right strip,
// then of the bottom strip, at least 2 CTAs per SM (more registers: no spills).
template <InType T, int kBlock, int kOut, bool kWhole>
__global__ void __launch_bounds__(kThreads, !kWhole ? 2 : T == InType::kF32 ? 3 : 4)
    portable_quantize_tile_kernel(TileArgs a) {
  using Chunk = typename TileLayout<T, kBlock>::Chunk;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Chunk* const tile = reinterpret_cast<Chunk*>(smem_raw);
  __shared__ uint32_t warp_amax[kWarps];
  const int64_t right = a.whole_rt * (a.col_tiles - a.whole_ct);  // edge tiles on the right
  const int64_t edges = right + (a.row_tiles - a.whole_rt) * a.col_tiles;
  for (int64_t b = blockIdx.z; b < a.batch; b += gridDim.z) {
    if constexpr (kWhole) {
      for (int64_t rt = blockIdx.y; rt < a.whole_rt; rt += gridDim.y) {
        for (int64_t ct = blockIdx.x; ct < a.whole_ct; ct += gridDim.x) {
          __syncthreads();  // the previous tile is done with `tile` and warp_amax
          quantize_tile<T, kBlock, kOut, true>(a, tile, warp_amax, b, rt, ct);
        }
      }
    } else {
      for (int64_t e = blockIdx.x; e < edges; e += gridDim.x) {
        const int64_t cols = e < right ? a.col_tiles - a.whole_ct : a.col_tiles;
        const int64_t i = e < right ? e : e - right;
        const int64_t rt = i / cols + (e < right ? 0 : a.whole_rt);
        const int64_t ct = i % cols + (e < right ? a.whole_ct : 0);
        __syncthreads();
        quantize_tile<T, kBlock, kOut, false>(a, tile, warp_amax, b, rt, ct);
      }
    }
  }
}

// Launches the tiled kernel when it applies: blocks of 64 and 128 (a 256 x 256 tile would
// take 128 KB of shared memory in bfloat16, leaving no room for a second CTA); *launched
// says whether it did.
template <int kOut>
ffi::Error launch_tile(cudaStream_t stream, ffi::DataType x_type, int64_t block,
                       const TileArgs& a, bool* launched) {
  *launched = block == 64 || block == 128;
  if (!*launched) return ffi::Error::Success();
  if (a.batch == 0 || a.row_tiles * a.col_tiles == 0) return ffi::Error::Success();
  const int64_t edges = a.row_tiles * a.col_tiles - a.whole_rt * a.whole_ct;  // per batch entry
  const unsigned batch = static_cast<unsigned>(std::min<int64_t>(a.batch, 65535));
  return dispatch_input(x_type, [&](auto tag) -> ffi::Error {
    constexpr InType T = decltype(tag)::value;
    auto go = [&](auto kernel, size_t smem, dim3 grid) -> ffi::Error {
      if (smem > 48 * 1024) {
        FP8GEMM_RETURN_IF_ERROR(cuda_status(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
            "portable_quantize_tile_kernel smem"));
      }
      kernel<<<grid, kThreads, smem, stream>>>(a);
      return launch_status("portable_quantize_tile_kernel");
    };
    auto whole_then_edges = [&](auto blk) -> ffi::Error {
      constexpr int kBlock = decltype(blk)::value;
      constexpr size_t kSmem = TileLayout<T, kBlock>::kSmem;
      if (a.whole_rt > 0 && a.whole_ct > 0) {
        const dim3 grid(static_cast<unsigned>(std::min<int64_t>(a.whole_ct, INT32_MAX)),
                        static_cast<unsigned>(std::min<int64_t>(a.whole_rt, 65535)), batch);
        FP8GEMM_RETURN_IF_ERROR(
            go(portable_quantize_tile_kernel<T, kBlock, kOut, true>, kSmem, grid));
      }
      if (edges == 0) return ffi::Error::Success();
      return go(portable_quantize_tile_kernel<T, kBlock, kOut, false>, kSmem,
                dim3(grid_for(edges), 1, batch));
    };
    if (block == 64) return whole_then_edges(std::integral_constant<int, 64>{});
    return whole_then_edges(std::integral_constant<int, 128>{});
  });
}

// Inputs of at most this many tiles, edge tiles among them, run in the edge launch alone: the
// 2 x 132 edge CTAs an H200 holds at once take them in one wave, faster than two launches.
constexpr int64_t kOneLaunchTiles = 264;

TileArgs tile_args(const QuantizeBlockOp& op, uint8_t* qt, float* scales_t) {
  const int64_t block = op.block_cols;
  TileArgs a{op.x,         op.transpose ? nullptr : op.q, op.transpose ? op.q : qt,
             op.transpose ? nullptr : op.scales,          op.transpose ? op.scales : scales_t,
             op.format,    op.batch, op.rows, op.cols, ceil_div(op.rows, block),
             ceil_div(op.cols, block)};
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const int64_t chunk_values = op.x_type == ffi::DataType::F32 ? 4 : 8;
  a.x_vectors = aligned(a.x) && a.cols % chunk_values == 0;
  a.aligned = a.x_vectors && aligned(a.q) && aligned(a.qt) && a.rows % 8 == 0 &&
              a.cols % 8 == 0;
  a.whole_rt = a.aligned ? a.rows / block : 0;
  a.whole_ct = a.aligned ? a.cols / block : 0;
  const int64_t tiles = a.batch * a.row_tiles * a.col_tiles;
  if (tiles <= kOneLaunchTiles && tiles != a.batch * a.whole_rt * a.whole_ct) {
    a.whole_rt = a.whole_ct = 0;
  }
  return a;
}

// Whether portable_quantize_rows_kernel applies (its vector accesses need 16-byte alignment).
bool rows_kernel_applies(const QuantizeBlockOp& op) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return op.block_rows == 1 && !op.transpose && op.cols % op.block_cols == 0 &&
         aligned(op.x) && aligned(op.q);
}

// Launches the kernel that fits op (decoded and validated).
ffi::Error launch_quantize_block(cudaStream_t stream, const QuantizeBlockOp& op) {
  BlockArgs a{op.x,         op.q,           op.scales,      op.format,
              op.rows,      op.cols,        op.out_rows(),  op.out_cols(),
              op.scale_rows(), op.scale_cols(), op.block_rows, op.block_cols,
              op.transpose, op.batch * op.scale_rows() * op.scale_cols()};
  if (a.tasks == 0) return ffi::Error::Success();
  bool launched = false;
  if (op.block_rows == 1 && op.transpose) {
    FP8GEMM_RETURN_IF_ERROR(launch_tile<kOutCols>(stream, op.x_type, op.block_cols,
                                                  tile_args(op, nullptr, nullptr), &launched));
  } else if (op.block_rows > 1 && !op.transpose) {
    FP8GEMM_RETURN_IF_ERROR(launch_tile<kOutSquare>(stream, op.x_type, op.block_cols,
                                                    tile_args(op, nullptr, nullptr), &launched));
  }
  if (launched) return ffi::Error::Success();
  return dispatch_input(op.x_type, [&](auto tag) -> ffi::Error {
    constexpr InType T = decltype(tag)::value;
    if (rows_kernel_applies(op)) {
      const unsigned grid = grid_for(ceil_div(a.tasks, int64_t{kRunsPerWarp} * kWarps));
      switch (op.block_cols) {
        case 64:
          portable_quantize_rows_kernel<T, 64><<<grid, kThreads, 0, stream>>>(
              op.x, op.q, op.scales, a.tasks, op.format);
          break;
        case 256:
          portable_quantize_rows_kernel<T, 256><<<grid, kThreads, 0, stream>>>(
              op.x, op.q, op.scales, a.tasks, op.format);
          break;
        default:
          portable_quantize_rows_kernel<T, 128><<<grid, kThreads, 0, stream>>>(
              op.x, op.q, op.scales, a.tasks, op.format);
      }
      return launch_status("portable_quantize_rows_kernel");
    }
    if (op.block_rows == 1 && op.transpose) {  // block 256
      BlockArgs t = a;  // one task per tile of block_cols x-rows by kTileCols x-columns
      t.tasks = op.batch * a.scale_cols * ceil_div(op.cols, int64_t{kTileCols});
      portable_quantize_cols_kernel<T, 256><<<grid_for(t.tasks), kThreads, 0, stream>>>(t);
      return launch_status("portable_quantize_cols_kernel");
    }
    if (op.block_rows == 1) {
      portable_quantize_block_kernel<T, 1>
          <<<grid_for(ceil_div(a.tasks, kWarps)), kThreads, 0, stream>>>(a);
    } else {
      portable_quantize_block_kernel<T, kWarps><<<grid_for(a.tasks), kThreads, 0, stream>>>(a);
    }
    return launch_status("portable_quantize_block_kernel");
  });
}

ffi::Error QuantizeBlockImpl(cudaStream_t stream, ffi::AnyBuffer x,
                             ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> scales,
                             int64_t block_rows, int64_t block_cols, bool transpose) {
  QuantizeBlockOp op;
  FP8GEMM_RETURN_IF_ERROR(
      DecodeQuantizeBlock(x, q, scales, block_rows, block_cols, transpose, &op));
  return launch_quantize_block(stream, op);
}

ffi::Error QuantizeDualImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                            ffi::Result<ffi::AnyBuffer> scales, ffi::Result<ffi::AnyBuffer> qt,
                            ffi::Result<ffi::AnyBuffer> scales_t, int64_t block) {
  QuantizeDualOp op;
  FP8GEMM_RETURN_IF_ERROR(DecodeQuantizeDual(x, q, scales, qt, scales_t, block, &op));
  bool launched = false;
  FP8GEMM_RETURN_IF_ERROR(launch_tile<kOutRows | kOutCols>(
      stream, op.rows.x_type, block, tile_args(op.rows, op.cols.q, op.cols.scales), &launched));
  if (launched) return ffi::Error::Success();
  // Blocks of 256: the two layouts from the two single kernels, x read twice.
  FP8GEMM_RETURN_IF_ERROR(launch_quantize_block(stream, op.rows));
  return launch_quantize_block(stream, op.cols);
}

}  // namespace
}  // namespace fp8gemm::cuda

namespace ffi = xla::ffi;

#define FP8GEMM_BIND ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_quantize_tensor_cuda, fp8gemm::cuda::QuantizeTensorImpl,
                              FP8GEMM_BIND_QUANTIZE_TENSOR(FP8GEMM_BIND),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_quantize_block_cuda, fp8gemm::cuda::QuantizeBlockImpl,
                              FP8GEMM_BIND_QUANTIZE_BLOCK(FP8GEMM_BIND),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_quantize_dual_cuda, fp8gemm::cuda::QuantizeDualImpl,
                              FP8GEMM_BIND_QUANTIZE_DUAL(FP8GEMM_BIND),
                              {ffi::Traits::kCmdBufferCompatible});
