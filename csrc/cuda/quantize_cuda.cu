// Portable CUDA backend of the quantization primitives (per-tensor and blockwise). Simple
// and correct rather than fast; computes exactly the function of cpu/quantize_cpu.cc.
//
// Bitwise agreement with the CPU: the amax is a max (exact in any order), the scale is the
// same float expression, q = float_to_fp8(x / scale) uses the shared fp8.h conversion and an
// IEEE division (nvcc's default -prec-div=true -ftz=false; this file must never be built
// with --use_fast_math).
//
// Per-tensor (x [G, L]): a row's amax must be final before any of its values is cast, and
// there is no scratch buffer, so the call is a memset and three launches on the stream:
//   1. portable_amax_kernel: each warp reduces the bits of |x| (cuda_utils.cuh: their
//      unsigned max is the NaN-propagating amax) over part of row g and atomicMax-es them
//      into the zeroed scale[g], which holds amax bits until
//   2. portable_scale_kernel: one thread per row turns them into the scale, in place;
//   3. portable_cast_tensor_kernel: q = fp8(x / scale[g]).
// Blockwise: one warp (1 x block scales) or one CTA (block x block) per scale block reduces
// the block's amax and then casts its values; nothing crosses blocks, so one launch. The
// two 1 x block cases of training have their own kernels: along rows whose length is a
// multiple of the block (activations and gradients: one vector load and store per lane),
// and transposed (the weight gradient's operands: tiles staged in shared memory, so that
// reads and writes both run along the contiguous axis).
#include "../common/ops.h"
#include "../common/bindings.h"
#include "../handlers.h"
#include "cuda_utils.cuh"

namespace fp8gemm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;  // per thread per task of the per-tensor kernels
constexpr int64_t kChunk = int64_t{kThreads} * kItems;
static_assert(kThreads % 32 == 0, "kernels reduce per warp: whole warps only");

// ---------------------------------------------------------------------------------------
// Per-tensor. A task is a chunk of kChunk values of one row, so every warp of a task
// belongs to one row (one atomic per warp) and a row's scale is read once per task.

template <InType T>
__global__ void __launch_bounds__(kThreads)
    portable_amax_kernel(const void* x, uint32_t* amax_bits, int64_t length, int64_t chunks,
                         int64_t tasks) {
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t g = task / chunks;
    const int64_t begin = (task % chunks) * kChunk;
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = begin + j * kThreads + threadIdx.x;
      if (i < length) m = umax(m, abs_bits(load_input<T>(x, g * length + i)));
    }
    m = warp_max(m);
    if (threadIdx.x % 32 == 0 && m != 0) atomicMax(amax_bits + g, m);
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

template <InType T>
__global__ void __launch_bounds__(kThreads)
    portable_cast_tensor_kernel(const void* x, const float* scale, uint8_t* q, int64_t length,
                                int64_t chunks, int64_t tasks, Fp8Format format) {
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t g = task / chunks;
    const int64_t begin = (task % chunks) * kChunk;
    const float s = scale[g];
#pragma unroll 2
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = g * length + begin + j * kThreads + threadIdx.x;
      if (begin + j * kThreads + threadIdx.x < length) {
        q[i] = float_to_fp8(load_input<T>(x, i) / s, format);
      }
    }
  }
}

ffi::Error QuantizeTensorImpl(cudaStream_t stream, ffi::AnyBuffer x,
                              ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> scale) {
  QuantizeTensorOp op;
  FP8GEMM_RETURN_IF_ERROR(DecodeQuantizeTensor(x, q, scale, &op));
  if (op.groups == 0) return ffi::Error::Success();
  uint32_t* amax_bits = reinterpret_cast<uint32_t*>(op.scale);
  // Zero bits = amax 0: the value of an empty row, and the identity of the max.
  FP8GEMM_RETURN_IF_ERROR(cuda_status(
      cudaMemsetAsync(amax_bits, 0, op.groups * sizeof(uint32_t), stream), "scale memset"));
  const int64_t chunks = ceil_div(op.length, kChunk);
  const int64_t tasks = op.groups * chunks;
  return dispatch_input(op.x_type, [&](auto tag) -> ffi::Error {
    constexpr InType T = decltype(tag)::value;
    if (tasks > 0) {
      portable_amax_kernel<T><<<grid_for(tasks), kThreads, 0, stream>>>(op.x, amax_bits,
                                                                          op.length, chunks, tasks);
      FP8GEMM_RETURN_IF_ERROR(launch_status("portable_amax_kernel"));
    }
    portable_scale_kernel<<<grid_for(ceil_div(op.groups, kThreads)), kThreads, 0, stream>>>(
        amax_bits, op.groups, op.format);
    FP8GEMM_RETURN_IF_ERROR(launch_status("portable_scale_kernel"));
    if (tasks > 0) {
      portable_cast_tensor_kernel<T><<<grid_for(tasks), kThreads, 0, stream>>>(
          op.x, op.scale, op.q, op.length, chunks, tasks, op.format);
      FP8GEMM_RETURN_IF_ERROR(launch_status("portable_cast_tensor_kernel"));
    }
    return ffi::Error::Success();
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

    const float s = scale_from_amax(bits_to_float(m), a.format);
    if (lane == 0) a.scales[task] = s;  // task == (b * scale_rows + sr) * scale_cols + sc
    for (int e = lane; e < n; e += kGroupThreads) {
      int64_t r, c;
      out_rc(e, &r, &c);
      a.q[(b * a.out_rows + r) * a.out_cols + c] =
          float_to_fp8(load_input<T>(a.x, src(r, c)) / s, a.format);
    }
  }
}

// 1 x kBlock scales along x's rows, not transposed, every row a whole number of blocks: the
// blocks are consecutive kBlock-value runs of the flat array, scale b belongs to run b, and
// one warp quantizes a run with kBlock / 32 values per lane, read and written as one
// vector each. Each warp keeps two runs in flight (the loads of both before either's
// reduction) so that enough bytes are in flight to stream at the copy bandwidth.
template <InType T, int kBlock>
__global__ void __launch_bounds__(kThreads)
    portable_quantize_rows_kernel(const void* x, uint8_t* q, float* scales, int64_t blocks,
                                  Fp8Format format) {
  constexpr int kValues = kBlock / 32;
  constexpr int kUnroll = 2;
  using Elem = std::conditional_t<T == InType::kF32, float, uint16_t>;
  struct alignas(kValues * sizeof(Elem)) In {
    Elem v[kValues];
  };
  struct alignas(kValues) Out {
    uint8_t v[kValues];
  };
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t{gridDim.x} * kWarps;
  const int64_t first = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  for (int64_t b0 = first; b0 < blocks; b0 += kUnroll * warps) {
    In in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t b = b0 + u * warps;
      if (b < blocks) in[u] = static_cast<const In*>(x)[b * 32 + lane];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t b = b0 + u * warps;
      if (b >= blocks) break;  // uniform over the warp
      float v[kValues];
      uint32_t m = 0;
#pragma unroll
      for (int i = 0; i < kValues; ++i) {
        v[i] = load_input<T>(in[u].v, i);
        m = umax(m, abs_bits(v[i]));
      }
      const float s = scale_from_amax(bits_to_float(warp_max(m)), format);
      if (lane == 0) scales[b] = s;
      Out out;
#pragma unroll
      for (int i = 0; i < kValues; ++i) out.v[i] = float_to_fp8(v[i] / s, format);
      reinterpret_cast<Out*>(q)[b * 32 + lane] = out;
    }
  }
}

// 1 x kBlock scales along x's columns, transposed (x [rows, cols] -> q [cols, rows], the
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
      const float s = scale_from_amax(bits_to_float(warp_max(m)), a.format);
      if (lane == 0) a.scales[(b * a.out_rows + c) * a.scale_cols + rt] = s;
      uint8_t* out = a.q + (b * a.out_rows + c) * a.out_cols + r0;
      for (int e = 4 * lane; e < kBlock; e += 128) {
        uint8_t v[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) v[t] = float_to_fp8(tile[e + t][j] / s, a.format);
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

// Whether portable_quantize_rows_kernel applies (its vector accesses need 16-byte alignment).
bool rows_kernel_applies(const QuantizeBlockOp& op) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return op.block_rows == 1 && !op.transpose && op.cols % op.block_cols == 0 &&
         aligned(op.x) && aligned(op.q);
}

ffi::Error QuantizeBlockImpl(cudaStream_t stream, ffi::AnyBuffer x,
                             ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> scales,
                             int64_t block_rows, int64_t block_cols, bool transpose) {
  QuantizeBlockOp op;
  FP8GEMM_RETURN_IF_ERROR(
      DecodeQuantizeBlock(x, q, scales, block_rows, block_cols, transpose, &op));
  BlockArgs a{op.x,         op.q,           op.scales,      op.format,
              op.rows,      op.cols,        op.out_rows(),  op.out_cols(),
              op.scale_rows(), op.scale_cols(), op.block_rows, op.block_cols,
              op.transpose, op.batch * op.scale_rows() * op.scale_cols()};
  if (a.tasks == 0) return ffi::Error::Success();
  return dispatch_input(op.x_type, [&](auto tag) -> ffi::Error {
    constexpr InType T = decltype(tag)::value;
    if (rows_kernel_applies(op)) {
      const unsigned grid = grid_for(ceil_div(a.tasks, kWarps));
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
    if (op.block_rows == 1 && op.transpose) {
      BlockArgs t = a;  // one task per tile of block_cols x-rows by kTileCols x-columns
      t.tasks = op.batch * a.scale_cols * ceil_div(op.cols, int64_t{kTileCols});
      const unsigned grid = grid_for(t.tasks);
      switch (op.block_cols) {
        case 64: portable_quantize_cols_kernel<T, 64><<<grid, kThreads, 0, stream>>>(t); break;
        case 256: portable_quantize_cols_kernel<T, 256><<<grid, kThreads, 0, stream>>>(t); break;
        default: portable_quantize_cols_kernel<T, 128><<<grid, kThreads, 0, stream>>>(t);
      }
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
