// CPU backend of the quantization primitives (per-tensor and blockwise).
#include <cstring>

#include "../common/ops.h"
#include "../common/bindings.h"
#include "../handlers.h"
#include "parallel.h"

namespace fp8gemm::cpu {
namespace {

float load(const void* x, ffi::DataType type, int64_t i) {
  switch (type) {
    case ffi::DataType::BF16: return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
    case ffi::DataType::F16: return f16_to_float(static_cast<const uint16_t*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

ffi::Error QuantizeTensorImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                              ffi::Result<ffi::AnyBuffer> scale) {
  QuantizeTensorOp op;
  FP8GEMM_RETURN_IF_ERROR(DecodeQuantizeTensor(x, q, scale, &op));
  parallel_for(op.groups, [&](int64_t g) {
    const int64_t base = g * op.length;
    float amax = 0.0f;
    for (int64_t i = 0; i < op.length; ++i) amax = amax_update(amax, load(op.x, op.x_type, base + i));
    op.scale[g] = scale_from_amax(amax, op.format);
    const float inv = inverse_scale_from_amax(amax, op.format);
    for (int64_t i = 0; i < op.length; ++i) {
      op.q[base + i] = float_to_fp8(load(op.x, op.x_type, base + i) * inv, op.format);
    }
  });
  return ffi::Error::Success();
}

void quantize_blocks(const QuantizeBlockOp& op) {
  const int64_t out_rows = op.out_rows(), out_cols = op.out_cols();
  const int64_t srows = op.scale_rows(), scols = op.scale_cols();
  // Element (r, c) of the output layout, as an index into x.
  auto src = [&](int64_t b, int64_t r, int64_t c) {
    return b * op.rows * op.cols + (op.transpose ? c * op.cols + r : r * op.cols + c);
  };
  parallel_for(op.batch * srows, [&](int64_t task) {
    const int64_t b = task / srows, sr = task % srows;
    const int64_t r0 = sr * op.block_rows, r1 = std::min(out_rows, r0 + op.block_rows);
    for (int64_t sc = 0; sc < scols; ++sc) {
      const int64_t c0 = sc * op.block_cols, c1 = std::min(out_cols, c0 + op.block_cols);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = amax_update(amax, load(op.x, op.x_type, src(b, r, c)));
      op.scales[(b * srows + sr) * scols + sc] = scale_from_amax(amax, op.format);
      const float inv = inverse_scale_from_amax(amax, op.format);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c)
          op.q[(b * out_rows + r) * out_cols + c] =
              float_to_fp8(load(op.x, op.x_type, src(b, r, c)) * inv, op.format);
    }
  });
}

ffi::Error QuantizeBlockImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                             ffi::Result<ffi::AnyBuffer> scales, int64_t block_rows,
                             int64_t block_cols, bool transpose) {
  QuantizeBlockOp op;
  FP8GEMM_RETURN_IF_ERROR(
      DecodeQuantizeBlock(x, q, scales, block_rows, block_cols, transpose, &op));
  quantize_blocks(op);
  return ffi::Error::Success();
}

// The CPU has no bandwidth to save by fusing: the two layouts one after the other.
ffi::Error QuantizeDualImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                            ffi::Result<ffi::AnyBuffer> scales, ffi::Result<ffi::AnyBuffer> qt,
                            ffi::Result<ffi::AnyBuffer> scales_t, int64_t block) {
  QuantizeDualOp op;
  FP8GEMM_RETURN_IF_ERROR(DecodeQuantizeDual(x, q, scales, qt, scales_t, block, &op));
  quantize_blocks(op.rows);
  quantize_blocks(op.cols);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace fp8gemm::cpu

namespace ffi = xla::ffi;

#define FP8GEMM_BIND ffi::Ffi::Bind()

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_quantize_tensor_cpu, fp8gemm::cpu::QuantizeTensorImpl,
                              FP8GEMM_BIND_QUANTIZE_TENSOR(FP8GEMM_BIND));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_quantize_block_cpu, fp8gemm::cpu::QuantizeBlockImpl,
                              FP8GEMM_BIND_QUANTIZE_BLOCK(FP8GEMM_BIND));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8gemm_quantize_dual_cpu, fp8gemm::cpu::QuantizeDualImpl,
                              FP8GEMM_BIND_QUANTIZE_DUAL(FP8GEMM_BIND));
