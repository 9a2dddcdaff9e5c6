// CPU backend of the GEMM primitives: dense, grouped (contiguous and masked) and k-grouped.
//
// Each call becomes a list of Problems (common/problem.h) that one engine evaluates in
// 32 x 32 output tiles spread over threads. The numerics follow the GPU kernels: FP8
// products summed in float32 within a K block, then promoted with that block's scales into
// a float32 accumulator.
#include <cstring>
#include <vector>

#include "../common/ops.h"
#include "../common/bindings.h"
#include "../handlers.h"
#include "parallel.h"

namespace fp8gemm::cpu {
namespace {

constexpr int64_t kTile = 32;

// Decodes `count` K-major rows of op over [k_begin, k_end) into dst (row-major floats).
void decode_rows(const OperandView& op, int64_t row0, int64_t count, int64_t k_begin,
                 int64_t k_end, float* dst) {
  float lut[256];
  for (int v = 0; v < 256; ++v) lut[v] = fp8_to_float(static_cast<uint8_t>(v), op.format);
  const int64_t len = k_end - k_begin;
  for (int64_t r = 0; r < count; ++r) {
    const uint8_t* src = op.data + (row0 + r) * op.ld + k_begin;
    for (int64_t k = 0; k < len; ++k) dst[r * len + k] = lut[src[k]];
  }
}

// Float32 dot product in a fixed order: eight interleaved partial sums, then a pairwise
// tree. Products of FP8 values are exact in float32.
float block_dot(const float* a, const float* b, int64_t n) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += a[i + l] * b[i + l];
  for (int l = 0; i < n; ++i, ++l) lane[l] += a[i] * b[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

void store(const Problem& p, int64_t i, int64_t j, float acc) {
  const int64_t idx = i * p.ldo + j;
  if (p.c) acc += p.c[idx];
  if (p.out_type == OutType::kF32) {
    static_cast<float*>(p.out)[idx] = acc;
  } else {
    static_cast<uint16_t*>(p.out)[idx] = float_to_bf16(acc);
  }
}

void run_tile(const Problem& p, int64_t r0, int64_t c0, std::vector<float>& abuf,
              std::vector<float>& bbuf) {
  const int64_t rows = std::min(kTile, p.rows - r0), cols = std::min(kTile, p.cols - c0);
  const int64_t k_begin = p.k_begin, k_end = std::max(p.k_begin, p.k_end);
  const int64_t len = k_end - k_begin;
  abuf.resize(rows * len);
  bbuf.resize(cols * len);
  decode_rows(p.a, r0, rows, k_begin, k_end, abuf.data());
  decode_rows(p.b, c0, cols, k_begin, k_end, bbuf.data());
  const int64_t kb_first = k_begin / p.block;
  const int64_t kb_last = len > 0 ? (k_end - 1) / p.block : kb_first - 1;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      float acc = 0.0f;
      for (int64_t kb = kb_first; kb <= kb_last; ++kb) {
        const int64_t lo = std::max(k_begin, kb * p.block), hi = std::min(k_end, (kb + 1) * p.block);
        const float partial =
            block_dot(&abuf[i * len + (lo - k_begin)], &bbuf[j * len + (lo - k_begin)], hi - lo);
        acc += partial * (p.a.scale.at(r0 + i, kb) * p.b.scale.at(c0 + j, kb));
      }
      store(p, r0 + i, c0 + j, acc);
    }
  }
}

void run_problems(const std::vector<Problem>& problems) {
  struct Task { int64_t problem, r0, c0; };
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(problems.size()); ++i)
    for (int64_t r = 0; r < problems[i].rows; r += kTile)
      for (int64_t c = 0; c < problems[i].cols; c += kTile) tasks.push_back({i, r, c});
  parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    thread_local std::vector<float> abuf, bbuf;
    run_tile(problems[tasks[t].problem], tasks[t].r0, tasks[t].c0, abuf, bbuf);
  });
}

size_t out_bytes(OutType t) { return t == OutType::kF32 ? 4 : 2; }

ffi::Error GemmImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer sa, ffi::AnyBuffer sb,
                    std::optional<ffi::AnyBuffer> c, ffi::Result<ffi::AnyBuffer> out,
                    int64_t scale_mode, int64_t block_size) {
  Problem p;
  FP8GEMM_RETURN_IF_ERROR(DecodeGemm(a, b, sa, sb, c, out, scale_mode, block_size, &p));
  run_problems({p});
  return ffi::Error::Success();
}

ffi::Error Grouped(bool masked, ffi::AnyBuffer x, ffi::AnyBuffer sizes, ffi::AnyBuffer w,
                   ffi::AnyBuffer sx, ffi::AnyBuffer sw, ffi::Result<ffi::AnyBuffer> out,
                   int64_t scale_mode, int64_t block_size) {
  GroupedOp op;
  FP8GEMM_RETURN_IF_ERROR(
      DecodeGrouped(masked, x, sizes, w, sx, sw, out, scale_mode, block_size, &op));
  // Rows outside every group are zeros.
  std::memset(op.out, 0, op.batch * op.rows_per_batch() * op.n * out_bytes(op.out_type));
  std::vector<Problem> problems;
  for (int64_t b = 0; b < op.batch; ++b) {
    const int32_t* s = op.sizes + b * op.groups;
    for (int64_t g = 0; g < op.groups; ++g) {
      int64_t r0 = 0, r1 = 0;
      if (masked) {
        r0 = g * op.m;
        r1 = r0 + masked_rows(s[g], op.m);
      } else {
        group_rows(s, g, op.m, &r0, &r1);
      }
      if (r1 > r0) problems.push_back(op.problem(b, g, r0, r1));
    }
  }
  run_problems(problems);
  return ffi::Error::Success();
}

ffi::Error GroupedContiguousImpl(ffi::AnyBuffer x, ffi::AnyBuffer sizes, ffi::AnyBuffer w,
                                 ffi::AnyBuffer sx, ffi::AnyBuffer sw,
                                 ffi::Result<ffi::AnyBuffer> out, int64_t scale_mode,
                                 int64_t block_size) {
  return Grouped(false, x, sizes, w, sx, sw, out, scale_mode, block_size);
}

ffi::Error GroupedMaskedImpl(ffi::AnyBuffer x, ffi::AnyBuffer sizes, ffi::AnyBuffer w,
                             ffi::AnyBuffer sx, ffi::AnyBuffer sw,
                             ffi::Result<ffi::AnyBuffer> out, int64_t scale_mode,
                             int64_t block_size) {
  return Grouped(true, x, sizes, w, sx, sw, out, scale_mode, block_size);
}

ffi::Error GroupedKGroupedImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer sizes,
                               ffi::AnyBuffer sa, ffi::AnyBuffer sb,
                               std::optional<ffi::AnyBuffer> c,
                               ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  KGroupedOp op;
  FP8GEMM_RETURN_IF_ERROR(DecodeKGrouped(a, b, sizes, sa, sb, c, out, block_size, &op));
  std::vector<Problem> problems;
  for (int64_t bi = 0; bi < op.batch; ++bi) {
    for (int64_t g = 0; g < op.groups; ++g) {
      int64_t t0 = 0, t1 = 0;
      group_rows(op.sizes + bi * op.groups, g, op.t, &t0, &t1);
      problems.push_back(op.problem(bi, g, t0, t1));  // an empty group still writes zeros
    }
  }
  run_problems(problems);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace fp8gemm::cpu

namespace ffi = xla::ffi;

#define FP8GEMM_BIND ffi::Ffi::Bind()

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_gemm_cpu, fp8gemm::cpu::GemmImpl,
                              FP8GEMM_BIND_GEMM(FP8GEMM_BIND));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_grouped_contiguous_cpu, fp8gemm::cpu::GroupedContiguousImpl,
                              FP8GEMM_BIND_GROUPED(FP8GEMM_BIND));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_grouped_masked_cpu, fp8gemm::cpu::GroupedMaskedImpl,
                              FP8GEMM_BIND_GROUPED(FP8GEMM_BIND));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_grouped_kgrouped_cpu, fp8gemm::cpu::GroupedKGroupedImpl,
                              FP8GEMM_BIND_KGROUPED(FP8GEMM_BIND));
