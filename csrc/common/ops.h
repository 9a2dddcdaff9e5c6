// Decoding and validation of every FFI call, shared by the CPU and CUDA handlers.
//
// Each Decode* function checks dtypes, ranks, shapes and attributes against the contract
// that the Python abstract-eval rules also enforce (docs/DESIGN.md, "Primitives"), and
// returns a plain struct of pointers and sizes. A handler never touches a buffer that this
// layer has not validated, so a mismatch gets an ffi::Error instead of an out-of-bounds
// access, whatever reaches the custom call.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "problem.h"
#include "xla/ffi/api/ffi.h"

namespace fp8gemm {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------------------------------
// Small validation helpers.

inline std::string shape_str(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline ffi::Error invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_fp8gemm: " + msg);
}

inline ffi::Error expect_shape(const char* name, const ffi::AnyBuffer& buf,
                               const std::vector<int64_t>& want) {
  auto dims = buf.dimensions();
  bool ok = dims.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = dims[i] == want[i];
  if (!ok) return invalid(std::string(name) + " has shape " + shape_str(dims) + ", expected " +
                          shape_str(want));
  return ffi::Error::Success();
}

inline ffi::Error expect_rank(const char* name, const ffi::AnyBuffer& buf, size_t rank) {
  if (buf.dimensions().size() != rank) {
    return invalid(std::string(name) + " has shape " + shape_str(buf.dimensions()) +
                   ", expected rank " + std::to_string(rank));
  }
  return ffi::Error::Success();
}

inline ffi::Error fp8_format(const char* name, ffi::DataType t, Fp8Format* out) {
  if (t == ffi::DataType::F8E4M3FN) { *out = Fp8Format::kE4M3; return ffi::Error::Success(); }
  if (t == ffi::DataType::F8E5M2) { *out = Fp8Format::kE5M2; return ffi::Error::Success(); }
  return invalid(std::string(name) + " must be float8_e4m3fn or float8_e5m2");
}

inline ffi::Error expect_dtype(const char* name, ffi::DataType got, ffi::DataType want,
                               const char* want_name) {
  if (got != want) return invalid(std::string(name) + " must be " + want_name);
  return ffi::Error::Success();
}

inline bool is_float_input(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

inline ffi::Error out_type(const char* name, ffi::DataType t, OutType* out) {
  if (t == ffi::DataType::BF16) { *out = OutType::kBF16; return ffi::Error::Success(); }
  if (t == ffi::DataType::F32) { *out = OutType::kF32; return ffi::Error::Success(); }
  return invalid(std::string(name) + " must be bfloat16 or float32");
}

inline ffi::Error check_block(int64_t block) {
  if (block != 64 && block != 128 && block != 256) {
    return invalid("block_size must be 64, 128 or 256, got " + std::to_string(block));
  }
  return ffi::Error::Success();
}

#define FP8GEMM_RETURN_IF_ERROR(expr)            \
  do {                                           \
    ffi::Error _err = (expr);                    \
    if (_err.failure()) return _err;             \
  } while (0)

// ---------------------------------------------------------------------------------------
// Quantization.

// Per-tensor: x [G, L] -> q [G, L], scale [G] (one scale per leading index; G = 1 for a
// plain tensor, larger under vmap).
struct QuantizeTensorOp {
  const void* x;
  ffi::DataType x_type;
  uint8_t* q;
  Fp8Format format;
  float* scale;
  int64_t groups, length;
};

inline ffi::Error DecodeQuantizeTensor(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                       ffi::Result<ffi::AnyBuffer> scale, QuantizeTensorOp* op) {
  FP8GEMM_RETURN_IF_ERROR(expect_rank("x", x, 2));
  if (!is_float_input(x.element_type())) return invalid("x must be float32, bfloat16 or float16");
  const int64_t g = x.dimensions()[0], l = x.dimensions()[1];
  FP8GEMM_RETURN_IF_ERROR(fp8_format("x_fp8", q->element_type(), &op->format));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("x_fp8", *q, {g, l}));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("scale", scale->element_type(), ffi::DataType::F32, "float32"));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("scale", *scale, {g}));
  *op = {x.untyped_data(), x.element_type(), static_cast<uint8_t*>(q->untyped_data()), op->format,
         static_cast<float*>(scale->untyped_data()), g, l};
  return ffi::Error::Success();
}

// Blockwise: x [B, R, C]; the output is x, or x transposed to [B, C, R] when `transpose`,
// quantized in block_rows x block_cols blocks of the *output* layout. block_rows is 1
// (activations, 1 x block per row) or equal to block_cols (weights, block x block).
struct QuantizeBlockOp {
  const void* x;
  ffi::DataType x_type;
  uint8_t* q;
  Fp8Format format;
  float* scales;
  int64_t batch, rows, cols;  // of x
  int64_t block_rows, block_cols;
  bool transpose;
  int64_t out_rows() const { return transpose ? cols : rows; }
  int64_t out_cols() const { return transpose ? rows : cols; }
  int64_t scale_rows() const { return ceil_div(out_rows(), block_rows); }
  int64_t scale_cols() const { return ceil_div(out_cols(), block_cols); }
};

inline ffi::Error DecodeQuantizeBlock(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                      ffi::Result<ffi::AnyBuffer> scales, int64_t block_rows,
                                      int64_t block_cols, bool transpose, QuantizeBlockOp* op,
                                      const char* q_name = "x_fp8",
                                      const char* scales_name = "scales") {
  FP8GEMM_RETURN_IF_ERROR(expect_rank("x", x, 3));
  if (!is_float_input(x.element_type())) return invalid("x must be float32, bfloat16 or float16");
  FP8GEMM_RETURN_IF_ERROR(check_block(block_cols));
  if (block_rows != 1 && block_rows != block_cols) {
    return invalid("block_shape must be (1, block_size) or (block_size, block_size)");
  }
  *op = {x.untyped_data(), x.element_type(), static_cast<uint8_t*>(q->untyped_data()),
         Fp8Format::kE4M3, static_cast<float*>(scales->untyped_data()), x.dimensions()[0],
         x.dimensions()[1], x.dimensions()[2], block_rows, block_cols, transpose};
  FP8GEMM_RETURN_IF_ERROR(fp8_format(q_name, q->element_type(), &op->format));
  FP8GEMM_RETURN_IF_ERROR(expect_shape(q_name, *q, {op->batch, op->out_rows(), op->out_cols()}));
  FP8GEMM_RETURN_IF_ERROR(
      expect_dtype(scales_name, scales->element_type(), ffi::DataType::F32, "float32"));
  return expect_shape(scales_name, *scales, {op->batch, op->scale_rows(), op->scale_cols()});
}

// Both 1 x block layouts of one x [B, R, C], from one read (the training recipe's
// activations and output gradients): rows (q [B, R, C], scales [B, R, ceil(C / block)]) and
// transposed (qt [B, C, R], scales_t [B, C, ceil(R / block)]).
struct QuantizeDualOp {
  QuantizeBlockOp rows, cols;
};

inline ffi::Error DecodeQuantizeDual(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                     ffi::Result<ffi::AnyBuffer> scales,
                                     ffi::Result<ffi::AnyBuffer> qt,
                                     ffi::Result<ffi::AnyBuffer> scales_t, int64_t block,
                                     QuantizeDualOp* op) {
  FP8GEMM_RETURN_IF_ERROR(DecodeQuantizeBlock(x, q, scales, 1, block, false, &op->rows));
  FP8GEMM_RETURN_IF_ERROR(
      DecodeQuantizeBlock(x, qt, scales_t, 1, block, true, &op->cols, "xt_fp8", "scales_t"));
  if (op->rows.format != op->cols.format) {
    return invalid("x_fp8 and xt_fp8 must have the same FP8 dtype");
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// GEMMs.

// Expected scale shape of a K-major operand with `rows` rows, for one problem.
inline std::vector<int64_t> scale_shape(ScaleMode mode, bool is_b, int64_t rows, int64_t k,
                                        int64_t block) {
  const int64_t kb = ceil_div(k, block);
  switch (mode) {
    case ScaleMode::kTensor: return {};
    case ScaleMode::kBlock: return {is_b ? ceil_div(rows, block) : rows, kb};
    case ScaleMode::kRow: return {rows, kb};
  }
  return {};
}

inline ScaleView scale_view(ScaleMode mode, bool is_b, const float* ptr, int64_t k,
                            int64_t block) {
  ScaleView v;
  v.ptr = ptr;
  if (mode == ScaleMode::kTensor) return v;
  v.row_div = (mode == ScaleMode::kBlock && is_b) ? block : 1;
  v.row_stride = ceil_div(k, block);
  v.kb_stride = 1;
  return v;
}

inline ffi::Error scale_mode(int64_t raw, ScaleMode* mode) {
  if (raw < 0 || raw > 2) return invalid("unknown scale_mode " + std::to_string(raw));
  *mode = static_cast<ScaleMode>(raw);
  return ffi::Error::Success();
}

inline std::vector<int64_t> concat(std::vector<int64_t> head, const std::vector<int64_t>& tail) {
  head.insert(head.end(), tail.begin(), tail.end());
  return head;
}

// Dense: a [M, K], b [N, K] (K-major), optional float32 accumulator c [M, N] -> out [M, N].
inline ffi::Error DecodeGemm(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer sa,
                             ffi::AnyBuffer sb, std::optional<ffi::AnyBuffer> c,
                             ffi::Result<ffi::AnyBuffer> out, int64_t mode_attr,
                             int64_t block, Problem* p) {
  ScaleMode mode;
  FP8GEMM_RETURN_IF_ERROR(scale_mode(mode_attr, &mode));
  FP8GEMM_RETURN_IF_ERROR(check_block(block));
  FP8GEMM_RETURN_IF_ERROR(expect_rank("a", a, 2));
  FP8GEMM_RETURN_IF_ERROR(expect_rank("b", b, 2));
  const int64_t m = a.dimensions()[0], k = a.dimensions()[1], n = b.dimensions()[0];
  FP8GEMM_RETURN_IF_ERROR(expect_shape("b", b, {n, k}));
  FP8GEMM_RETURN_IF_ERROR(fp8_format("a", a.element_type(), &p->a.format));
  FP8GEMM_RETURN_IF_ERROR(fp8_format("b", b.element_type(), &p->b.format));
  const std::vector<int64_t> one = {1};
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("scale_a", sa.element_type(), ffi::DataType::F32, "float32"));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("scale_b", sb.element_type(), ffi::DataType::F32, "float32"));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("scale_a", sa, mode == ScaleMode::kTensor ? one
                                                      : scale_shape(mode, false, m, k, block)));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("scale_b", sb, mode == ScaleMode::kTensor ? one
                                                      : scale_shape(mode, true, n, k, block)));
  FP8GEMM_RETURN_IF_ERROR(out_type("out", out->element_type(), &p->out_type));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("out", *out, {m, n}));
  if (c.has_value()) {
    FP8GEMM_RETURN_IF_ERROR(expect_dtype("accumulator", c->element_type(), ffi::DataType::F32, "float32"));
    FP8GEMM_RETURN_IF_ERROR(expect_shape("accumulator", *c, {m, n}));
    if (p->out_type != OutType::kF32) return invalid("accumulating requires a float32 output");
    p->c = static_cast<const float*>(c->untyped_data());
  }
  p->a.data = static_cast<const uint8_t*>(a.untyped_data());
  p->a.ld = k;
  p->a.scale = scale_view(mode, false, static_cast<const float*>(sa.untyped_data()), k, block);
  p->b.data = static_cast<const uint8_t*>(b.untyped_data());
  p->b.ld = k;
  p->b.scale = scale_view(mode, true, static_cast<const float*>(sb.untyped_data()), k, block);
  p->rows = m;
  p->cols = n;
  p->k_begin = 0;
  p->k_end = k;
  p->block = block;
  p->out = out->untyped_data();
  p->ldo = n;
  return ffi::Error::Success();
}

// M-grouped GEMMs (one weight matrix per group), in two row layouts:
//   contiguous: x [B, M, K], group_sizes [B, G]; group g's rows follow group g-1's
//   masked:     x [B, G, M, K], masked_m [B, G]; group g owns rows [0, masked_m) of its M
// w [Bw, G, N, K] with Bw 1 (shared by every batch entry) or B. Scales:
//   tensor: sx [B, G], sw [Bw, G];  block: sx [B, (G,) M, kb], sw [Bw, G, ceil(N/bs), kb].
// out [B, (G,) M, N]; rows outside every group are zero.
struct GroupedOp {
  bool masked;
  int64_t batch, groups, weight_batch, m, n, k, block;
  ScaleMode mode;
  Fp8Format fx, fw;
  OutType out_type;
  const uint8_t* x;
  const int32_t* sizes;  // group_sizes or masked_m, [B, G]
  const uint8_t* w;
  const float* sx;
  const float* sw;
  void* out;

  // Rows of batch entry b, group g: offsets into the [B, rows_per_batch] row space of x/out.
  int64_t rows_per_batch() const { return masked ? groups * m : m; }

  // Problem of (b, g) over its row range [r0, r1) (relative to batch entry b).
  FP8_HD Problem problem(int64_t b, int64_t g, int64_t r0, int64_t r1) const {
    const int64_t kb = ceil_div(k, block);
    const int64_t row0 = b * (masked ? groups * m : m) + r0;  // global row of x and out
    const int64_t wi = (weight_batch == 1 ? 0 : b) * groups + g;
    Problem p;
    p.a.data = x + row0 * k;
    p.a.ld = k;
    p.a.format = fx;
    p.b.data = w + wi * n * k;
    p.b.ld = k;
    p.b.format = fw;
    if (mode == ScaleMode::kTensor) {
      p.a.scale.ptr = sx + b * groups + g;
      p.b.scale.ptr = sw + wi;
    } else {
      p.a.scale = {sx + row0 * kb, 1, kb, 1};
      p.b.scale = {sw + wi * ceil_div(n, block) * kb, block, kb, 1};
    }
    p.rows = r1 - r0;
    p.cols = n;
    p.k_begin = 0;
    p.k_end = k;
    p.block = block;
    p.out_type = out_type;
    p.out = static_cast<char*>(out) + row0 * n * (out_type == OutType::kF32 ? 4 : 2);
    p.ldo = n;
    return p;
  }
};

inline ffi::Error DecodeGrouped(bool masked, ffi::AnyBuffer x, ffi::AnyBuffer sizes,
                                ffi::AnyBuffer w, ffi::AnyBuffer sx, ffi::AnyBuffer sw,
                                ffi::Result<ffi::AnyBuffer> out, int64_t mode_attr,
                                int64_t block, GroupedOp* op) {
  op->masked = masked;
  FP8GEMM_RETURN_IF_ERROR(scale_mode(mode_attr, &op->mode));
  if (op->mode == ScaleMode::kRow) return invalid("grouped GEMMs take tensor or block scales");
  FP8GEMM_RETURN_IF_ERROR(check_block(block));
  FP8GEMM_RETURN_IF_ERROR(expect_rank("x", x, masked ? 4 : 3));
  FP8GEMM_RETURN_IF_ERROR(expect_rank("w", w, 4));
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  op->batch = xd[0];
  op->groups = wd[1];
  op->weight_batch = wd[0];
  op->m = xd[masked ? 2 : 1];
  op->k = xd[masked ? 3 : 2];
  op->n = wd[2];
  op->block = block;
  const char* sizes_name = masked ? "masked_m" : "group_sizes";
  if (op->weight_batch != 1 && op->weight_batch != op->batch) {
    return invalid("w has batch " + std::to_string(op->weight_batch) + ", expected 1 or " +
                   std::to_string(op->batch));
  }
  FP8GEMM_RETURN_IF_ERROR(expect_shape("w", w, {op->weight_batch, op->groups, op->n, op->k}));
  if (masked) {
    FP8GEMM_RETURN_IF_ERROR(expect_shape("x", x, {op->batch, op->groups, op->m, op->k}));
  }
  FP8GEMM_RETURN_IF_ERROR(fp8_format("x", x.element_type(), &op->fx));
  FP8GEMM_RETURN_IF_ERROR(fp8_format("w", w.element_type(), &op->fw));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype(sizes_name, sizes.element_type(), ffi::DataType::S32, "int32"));
  FP8GEMM_RETURN_IF_ERROR(expect_shape(sizes_name, sizes, {op->batch, op->groups}));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("scale_x", sx.element_type(), ffi::DataType::F32, "float32"));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("scale_w", sw.element_type(), ffi::DataType::F32, "float32"));
  const int64_t kb = ceil_div(op->k, block);
  if (op->mode == ScaleMode::kTensor) {
    FP8GEMM_RETURN_IF_ERROR(expect_shape("scale_x", sx, {op->batch, op->groups}));
    FP8GEMM_RETURN_IF_ERROR(expect_shape("scale_w", sw, {op->weight_batch, op->groups}));
  } else {
    FP8GEMM_RETURN_IF_ERROR(expect_shape(
        "scale_x", sx, masked ? std::vector<int64_t>{op->batch, op->groups, op->m, kb}
                              : std::vector<int64_t>{op->batch, op->m, kb}));
    FP8GEMM_RETURN_IF_ERROR(expect_shape(
        "scale_w", sw, {op->weight_batch, op->groups, ceil_div(op->n, block), kb}));
  }
  FP8GEMM_RETURN_IF_ERROR(out_type("out", out->element_type(), &op->out_type));
  FP8GEMM_RETURN_IF_ERROR(expect_shape(
      "out", *out, masked ? std::vector<int64_t>{op->batch, op->groups, op->m, op->n}
                          : std::vector<int64_t>{op->batch, op->m, op->n}));
  op->x = static_cast<const uint8_t*>(x.untyped_data());
  op->sizes = static_cast<const int32_t*>(sizes.untyped_data());
  op->w = static_cast<const uint8_t*>(w.untyped_data());
  op->sx = static_cast<const float*>(sx.untyped_data());
  op->sw = static_cast<const float*>(sw.untyped_data());
  op->out = out->untyped_data();
  return ffi::Error::Success();
}

// K-grouped weight gradient: a [B, N, T], b [B, K, T] (token-major rows, both scaled
// 1 x block along the token axis T: sa [B, N, tb], sb [B, K, tb]), group_sizes [B, G] over
// the T tokens -> out [B, G, N, K] float32 with out[b, g] (= c[b, g] +) a_g @ b_g^T over
// group g's tokens. A group with no tokens gets zeros (or c).
struct KGroupedOp {
  int64_t batch, groups, n, k, t, block;
  Fp8Format fa, fb;
  const uint8_t* a;
  const uint8_t* b;
  const int32_t* sizes;
  const float* sa;
  const float* sb;
  const float* c;  // optional
  float* out;

  FP8_HD Problem problem(int64_t bi, int64_t g, int64_t t0, int64_t t1) const {
    const int64_t tb = ceil_div(t, block);
    Problem p;
    p.a = {a + bi * n * t, t, fa, {sa + bi * n * tb, 1, tb, 1}};
    p.b = {b + bi * k * t, t, fb, {sb + bi * k * tb, 1, tb, 1}};
    p.rows = n;
    p.cols = k;
    p.k_begin = t0;
    p.k_end = t1;
    p.block = block;
    p.out_type = OutType::kF32;
    p.out = out + (bi * groups + g) * n * k;
    p.c = c ? c + (bi * groups + g) * n * k : nullptr;
    p.ldo = k;
    return p;
  }
};

inline ffi::Error DecodeKGrouped(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer sizes,
                                 ffi::AnyBuffer sa, ffi::AnyBuffer sb,
                                 std::optional<ffi::AnyBuffer> c,
                                 ffi::Result<ffi::AnyBuffer> out, int64_t block,
                                 KGroupedOp* op) {
  FP8GEMM_RETURN_IF_ERROR(check_block(block));
  FP8GEMM_RETURN_IF_ERROR(expect_rank("a", a, 3));
  FP8GEMM_RETURN_IF_ERROR(expect_rank("b", b, 3));
  FP8GEMM_RETURN_IF_ERROR(expect_rank("group_sizes", sizes, 2));
  op->batch = a.dimensions()[0];
  op->n = a.dimensions()[1];
  op->t = a.dimensions()[2];
  op->k = b.dimensions()[1];
  op->groups = sizes.dimensions()[1];
  op->block = block;
  const int64_t tb = ceil_div(op->t, block);
  FP8GEMM_RETURN_IF_ERROR(expect_shape("b", b, {op->batch, op->k, op->t}));
  FP8GEMM_RETURN_IF_ERROR(fp8_format("a", a.element_type(), &op->fa));
  FP8GEMM_RETURN_IF_ERROR(fp8_format("b", b.element_type(), &op->fb));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("group_sizes", sizes.element_type(), ffi::DataType::S32, "int32"));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("group_sizes", sizes, {op->batch, op->groups}));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("scale_a", sa.element_type(), ffi::DataType::F32, "float32"));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("scale_b", sb.element_type(), ffi::DataType::F32, "float32"));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("scale_a", sa, {op->batch, op->n, tb}));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("scale_b", sb, {op->batch, op->k, tb}));
  FP8GEMM_RETURN_IF_ERROR(expect_dtype("out", out->element_type(), ffi::DataType::F32, "float32"));
  FP8GEMM_RETURN_IF_ERROR(expect_shape("out", *out, {op->batch, op->groups, op->n, op->k}));
  op->c = nullptr;
  if (c.has_value()) {
    FP8GEMM_RETURN_IF_ERROR(expect_dtype("accumulator", c->element_type(), ffi::DataType::F32, "float32"));
    FP8GEMM_RETURN_IF_ERROR(expect_shape("accumulator", *c, {op->batch, op->groups, op->n, op->k}));
    op->c = static_cast<const float*>(c->untyped_data());
  }
  op->a = static_cast<const uint8_t*>(a.untyped_data());
  op->b = static_cast<const uint8_t*>(b.untyped_data());
  op->sizes = static_cast<const int32_t*>(sizes.untyped_data());
  op->sa = static_cast<const float*>(sa.untyped_data());
  op->sb = static_cast<const float*>(sb.untyped_data());
  op->out = static_cast<float*>(out->untyped_data());
  return ffi::Error::Success();
}

}  // namespace fp8gemm
