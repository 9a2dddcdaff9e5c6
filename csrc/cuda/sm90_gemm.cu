// Host side of the Hopper GEMM (dense and grouped): when it applies, and which tile shape runs.
#include "sm90_gemm.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "sm90_gemm_launch.cuh"

namespace fp8gemm::sm90 {
namespace {

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

struct Tile {
  int m, n;
  // Throughput of the tile's mainloop relative to 256 x 128 when compute-bound (8192^3 on
  // the H200, docs/PERF.md).
  double speed;
};

// Whether the tile shape runs the scales (sm90_gemm_launch.cuh leaves out what would spill).
bool compiled(const Tile& t, bool row_scales, int block) {
  return tile_compiled(t.m, block, row_scales);
}

// The tile shape for `groups` independent row ranges of about `rows` rows each (1 for a
// dense GEMM) times N columns (docs/PERF.md has the measurements behind it). Up to 128 rows
// per group the GEMM streams the weights from memory: the cost is what each SM reads,
// rounds x (BLOCK_M + BLOCK_N) rows of K, so narrow tiles spread N over all SMs. Beyond, it
// is compute-bound: the cost is rounds x tile area / mainloop speed, which trades the last
// round's idle SMs against the faster wide tiles. Ties go to the earlier (larger) tile.
// Row scales (the weight gradient) have their own, smaller list.
Tile choose_tile(int64_t rows, int64_t groups, int64_t n, bool row_scales, int block, int sms) {
  static constexpr Tile kSmallM[] = {{128, 192, 0}, {128, 128, 0}, {64, 192, 0}, {64, 128, 0},
                                     {64, 64, 0},   {64, 32, 0},   {64, 16, 0}};
  static constexpr Tile kLargeM[] = {{256, 128, 1.0}, {128, 192, 0.96}, {128, 128, 0.94},
                                     {128, 160, 0.91}};
  static constexpr Tile kRowSmallM[] = {{128, 128, 0}, {64, 128, 0}, {64, 64, 0}};
  // 64x128's speed is an estimate (not measured): it runs when the larger tiles are not
  // compiled for the call (row scales in 64-wide blocks).
  static constexpr Tile kRowLargeM[] = {{256, 128, 1.0}, {128, 128, 0.91}, {64, 128, 0.8}};
  const bool small = rows <= 128;
  const Tile* first = row_scales ? (small ? kRowSmallM : kRowLargeM) : (small ? kSmallM : kLargeM);
  const int count = row_scales ? 3 : (small ? 7 : 4);
  Tile best{0, 0, 0};
  double best_cost = 0;
  for (const Tile* t = first; t != first + count; ++t) {
    if (!compiled(*t, row_scales, block)) continue;
    const int64_t tiles = groups * ceil_div(rows, int64_t(t->m)) * ceil_div(n, int64_t(t->n));
    const double r = double(ceil_div(tiles, int64_t(sms)));
    const double cost = small ? r * (t->m + t->n) : r * t->m * t->n / t->speed;
    if (best.m == 0 || cost < best_cost) best = *t, best_cost = cost;
  }
  return best;
}

// JAX_FP8GEMM_SM90_TILE=<BLOCK_M>x<BLOCK_N> (one of FP8GEMM_SM90_TILES) forces a tile, for
// tuning and for the tests that cover every tile; anything else, or a shape not compiled
// for the problem's scales, is ignored.
bool forced_tile(bool row_scales, int block, Tile* tile) {
  const char* env = std::getenv("JAX_FP8GEMM_SM90_TILE");
  int m = 0, n = 0;
  if (!env || std::sscanf(env, "%dx%d", &m, &n) != 2) return false;
#define FP8GEMM_SM90_MATCH_TILE(BM, BN, ROW) \
  if (m == BM && n == BN && row_scales == ROW) {   \
    *tile = {BM, BN, 0};                           \
    return compiled(*tile, row_scales, block);     \
  }
  FP8GEMM_SM90_TILES(FP8GEMM_SM90_MATCH_TILE)
#undef FP8GEMM_SM90_MATCH_TILE
  return false;
}

// Runs the chosen (or forced) tile shape.
ffi::Error run(const Operands& ops, const GemmParams& params, int64_t rows, int64_t groups,
               bool row_scales, cudaStream_t stream) {
  const int sms = device_info().sms;
  // Row scales by TMA on the compute-bound shapes (more than 128 rows per group). The
  // producer's gather of one float per row costs shared memory a transaction per row
  // (cp.async fills it a sector at a time): a fifth of the 256x128 mainloop's shared-memory
  // bandwidth. On the weight-streaming shapes TMA's 16-byte rows slowed the small tiles
  // instead (docs/PERF.md).
  GemmParams p = params;
  p.sa_tma = p.sb_tma = rows > 128;
  Tile tile;
  if (!forced_tile(row_scales, ops.block, &tile)) {
    tile = choose_tile(rows, groups, params.n, row_scales, ops.block, sms);
  }
#define FP8GEMM_SM90_RUN_TILE(BM, BN, ROW)                               \
  if (tile.m == BM && tile.n == BN && row_scales == ROW) {               \
    return launch_tile<BM, BN, ROW>(ops, p, stream, sms);                \
  }
  FP8GEMM_SM90_TILES(FP8GEMM_SM90_RUN_TILE)
#undef FP8GEMM_SM90_RUN_TILE
  return ffi::Error::Internal("jax_fp8gemm: no Hopper tile compiled for the chosen shape");
}

// TMA coordinates are 32-bit: K and every operand's rows must stay below 2^31.
bool fits_tma(int64_t k, int64_t a_rows, int64_t b_rows) {
  constexpr int64_t kMax = (int64_t(1) << 31) - kBlockK;
  return k < kMax && a_rows < kMax && b_rows < kMax;
}

}  // namespace

bool enabled() {
  const char* env = std::getenv("JAX_FP8GEMM_PORTABLE_KERNELS");
  if (env && std::string(env) == "1") return false;
  return device_info().hopper;
}

bool gemm(const Problem& p, ScaleMode mode, cudaStream_t stream, ffi::Error* status) {
  const int64_t k = p.k_end;
  if (!enabled() || p.k_begin != 0 || k % 16 != 0 || p.a.ld != k || p.b.ld != k ||
      p.ldo != p.cols || p.rows == 0 || p.cols == 0 || k == 0 || !fits_tma(k, p.rows, p.cols)) {
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
  const Operands ops{p.a.data, p.rows, p.b.data, p.cols, p.a.format, p.b.format,
                     static_cast<int>(p.block)};
  *status = run(ops, params, p.rows, 1, mode == ScaleMode::kRow, stream);
  return true;
}

bool grouped(const GroupedOp& op, cudaStream_t stream, ffi::Error* status) {
  const int64_t rows = op.batch * op.rows_per_batch();
  const int64_t experts = op.weight_batch * op.groups;
  if (!enabled() || op.mode == ScaleMode::kRow || op.k % 16 != 0 || op.k == 0 || rows == 0 ||
      op.n == 0 || experts == 0 || !fits_tma(op.k, rows, experts * op.n)) {
    return false;
  }
  const int64_t kb = ceil_div(op.k, op.block);
  GemmParams params;
  params.m = op.m;
  params.n = op.n;
  params.k = op.k;
  params.sa = op.sx;
  params.sb = op.sw;
  params.sa_ld = kb;
  params.sb_ld = kb;
  params.tensor_scales = op.mode == ScaleMode::kTensor;
  params.out = op.out;
  params.c = nullptr;
  params.out_f32 = op.out_type == OutType::kF32;
  params.sizes = op.sizes;
  params.masked = op.masked;
  params.batch = op.batch;
  params.groups = op.groups;
  params.weight_batch = op.weight_batch;
  params.sb_group_stride = ceil_div(op.n, op.block) * kb;
  const Operands ops{op.x, rows, op.w, experts * op.n, op.fx, op.fw, static_cast<int>(op.block)};
  // The tile is chosen for groups of the average size (contiguous) or of M_max (masked).
  const int64_t groups = op.batch * op.groups;
  const int64_t group_rows = op.masked ? op.m : ceil_div(op.m, op.groups);
  *status = run(ops, params, group_rows, groups, false, stream);
  return true;
}

bool kgrouped(const KGroupedOp& op, cudaStream_t stream, ffi::Error* status) {
  if (!enabled() || op.t % 16 != 0 || op.t == 0 || op.n == 0 || op.k == 0 || op.batch == 0 ||
      op.groups == 0 || !fits_tma(op.t, op.batch * op.n, op.batch * op.k)) {
    return false;
  }
  const int64_t tb = ceil_div(op.t, op.block);
  GemmParams params;
  params.m = op.n;  // out[b, g] = a_g @ b_g^T: [n, k] over the group's tokens
  params.n = op.k;
  params.k = op.t;
  params.sa = op.sa;
  params.sb = op.sb;
  params.sa_ld = tb;
  params.sb_ld = tb;
  params.tensor_scales = false;
  params.out = op.out;
  params.c = op.c;
  params.out_f32 = true;
  params.k_sizes = op.sizes;
  params.batch = op.batch;
  params.groups = op.groups;
  const Operands ops{op.a, op.batch * op.n, op.b, op.batch * op.k, op.fa, op.fb,
                     static_cast<int>(op.block)};
  *status = run(ops, params, op.n, op.batch * op.groups, true, stream);
  return true;
}

}  // namespace fp8gemm::sm90
