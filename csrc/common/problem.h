// Backend-neutral description of the work one FFI call asks for.
//
// Every GEMM in the library, dense or grouped, is a set of block-scaled problems of one form:
//
//   out[i, j] (= c[i, j] +) sum over K blocks kb of
//       scale_a(i, kb) * scale_b(j, kb) * sum_{k in block kb, k_begin <= k < k_end} a[i, k] * b[j, k]
//
// with both operands K-major (rows of K contiguous values: the layout Hopper's FP8 tensor
// cores read). The products inside one K block are summed in float32 and then promoted into
// a float32 accumulator with that block's scales (the DeepSeek-V3 two-level accumulation).
// The handlers decode their buffers into these structs (ops.h), and the CPU backend and the
// portable CUDA kernels evaluate them.
#pragma once

#include <cstdint>

#include "fp8.h"

namespace fp8gemm {

// How the scales of an operand are laid out. Values are the FFI attribute `scale_mode`.
enum class ScaleMode : int32_t {
  kTensor = 0,  // one scale per tensor (per group for grouped GEMMs)
  kBlock = 1,   // a: 1 x block per row along K; b: block x block   ("1D2D")
  kRow = 2,     // a and b: 1 x block per row along K                ("1D1D", weight gradients)
};

enum class OutType : int32_t { kBF16 = 0, kF32 = 1 };

// scale(row, kb) = ptr[(row / row_div) * row_stride + kb * kb_stride]. A per-tensor scale
// has both strides 0, so one formula serves every ScaleMode.
struct ScaleView {
  const float* ptr = nullptr;
  int64_t row_div = 1;
  int64_t row_stride = 0;
  int64_t kb_stride = 0;

  FP8_HD float at(int64_t row, int64_t kb) const {
    return ptr[(row / row_div) * row_stride + kb * kb_stride];
  }
};

// One K-major FP8 operand: row r starts at data + r * ld.
struct OperandView {
  const uint8_t* data = nullptr;
  int64_t ld = 0;
  Fp8Format format = Fp8Format::kE4M3;
  ScaleView scale;
};

// One block-scaled product: rows x cols outputs over the K range [k_begin, k_end).
// K blocks are aligned to absolute multiples of `block` (so a range may start or end inside
// a block, as the k-grouped weight gradient's groups do).
struct Problem {
  OperandView a, b;
  int64_t rows = 0, cols = 0;
  int64_t k_begin = 0, k_end = 0;
  int64_t block = 128;
  void* out = nullptr;          // rows x cols, leading dimension ldo
  const float* c = nullptr;     // optional float32 accumulator, same layout as out
  int64_t ldo = 0;
  OutType out_type = OutType::kBF16;
};

// Row range [begin, end) of group g among `rows` rows laid out contiguously by group.
// The out-of-range policy lives here, for every backend: a negative size counts as 0, and
// a group that would run past the last row is cut at it (so later groups are empty).
FP8_HD void group_rows(const int32_t* sizes, int64_t g, int64_t rows, int64_t* begin,
                       int64_t* end) {
  int64_t offset = 0;
  for (int64_t i = 0; i < g; ++i) offset += sizes[i] > 0 ? sizes[i] : 0;
  int64_t size = sizes[g] > 0 ? sizes[g] : 0;
  *begin = offset < rows ? offset : rows;
  *end = offset + size < rows ? offset + size : rows;
}

// Masked layout: group g owns rows [0, masked_m[g]) of its own M_max rows, clamped.
FP8_HD int64_t masked_rows(int32_t masked_m, int64_t m_max) {
  return masked_m < 0 ? 0 : (masked_m > m_max ? m_max : masked_m);
}

FP8_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fp8gemm
