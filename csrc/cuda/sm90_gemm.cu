// Host side of the Hopper dense GEMM: when it applies, and which tile shape runs.
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

int64_t rounds(int64_t m, int64_t n, const Tile& t, int sms) {
  const int64_t tiles = ceil_div(m, int64_t(t.m)) * ceil_div(n, int64_t(t.n));
  return ceil_div(tiles, int64_t(sms));
}

// The tile shape for an M x N output (docs/PERF.md has the measurements behind it). Up to
// 128 rows the GEMM streams the weight from memory: the cost is what each SM reads,
// rounds x (BLOCK_M + BLOCK_N) rows of K, so narrow tiles spread N over all SMs. Beyond,
// it is compute-bound: the cost is rounds x tile area / mainloop speed, which trades the
// last round's idle SMs against the faster wide tiles. Ties go to the larger tile.
Tile choose_tile(int64_t m, int64_t n, int sms) {
  static constexpr Tile kSmallM[] = {{128, 128, 0}, {64, 192, 0}, {64, 128, 0}, {64, 64, 0},
                                     {64, 32, 0},   {64, 16, 0}};
  static constexpr Tile kLargeM[] = {{256, 128, 1.0}, {128, 192, 0.96}, {128, 128, 0.94},
                                     {128, 160, 0.91}};
  Tile best{0, 0, 0};
  double best_cost = 0;
  if (m <= 128) {
    for (const Tile& t : kSmallM) {
      const double cost = double(rounds(m, n, t, sms)) * (t.m + t.n);
      if (best.m == 0 || cost < best_cost) best = t, best_cost = cost;
    }
  } else {
    for (const Tile& t : kLargeM) {
      const double cost = double(rounds(m, n, t, sms)) * t.m * t.n / t.speed;
      if (best.m == 0 || cost < best_cost) best = t, best_cost = cost;
    }
  }
  return best;
}

// JAX_FP8GEMM_SM90_TILE=<BLOCK_M>x<BLOCK_N> (one of FP8GEMM_SM90_TILES) forces a tile, for
// tuning and for the tests that cover every tile; anything else is ignored.
bool forced_tile(Tile* tile) {
  const char* env = std::getenv("JAX_FP8GEMM_SM90_TILE");
  int m = 0, n = 0;
  if (!env || std::sscanf(env, "%dx%d", &m, &n) != 2) return false;
#define FP8GEMM_SM90_MATCH_TILE(BM, BN) \
  if (m == BM && n == BN) {             \
    *tile = {BM, BN, 0};                \
    return true;                        \
  }
  FP8GEMM_SM90_TILES(FP8GEMM_SM90_MATCH_TILE)
#undef FP8GEMM_SM90_MATCH_TILE
  return false;
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
  Tile tile;
  if (!forced_tile(&tile)) tile = choose_tile(p.rows, p.cols, sms);
#define FP8GEMM_SM90_RUN_TILE(BM, BN)                                \
  if (tile.m == BM && tile.n == BN) {                                \
    *status = launch_tile<BM, BN>(p, params, stream, sms);           \
    return true;                                                     \
  }
  FP8GEMM_SM90_TILES(FP8GEMM_SM90_RUN_TILE)
#undef FP8GEMM_SM90_RUN_TILE
  return false;  // unreachable: every chosen tile is compiled
}

}  // namespace fp8gemm::sm90
