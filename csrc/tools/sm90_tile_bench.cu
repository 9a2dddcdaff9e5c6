// Standalone timing of the Hopper dense GEMM's tile shapes, without JAX (a development tool,
// not part of the library). Built on a machine without a GPU, run on the H200:
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//        -cudart static -I csrc -I $(python3 -c "import jax; print(jax.ffi.include_dir())") \
//        csrc/tools/sm90_tile_bench.cu -o sm90_tile_bench
//   ./sm90_tile_bench M N K ["256x128 128x192 ..."] [iterations] [row] [cold] [tma]
//                     [groups=G | masked=G | padded=G] [seed=S]
//
// For each tile it checks sampled rows against a simple reference kernel (error relative to
// the bf16 rounding of the result plus 1e-3 of sum |a b| * scales: the tensor cores' in-block
// precision), then times back-to-back launches with CUDA events (e4m3, 1 x 128 / 128 x 128
// scales, bf16 out). With `row` it runs the weight gradient's 1D1D form on the row-scale
// tiles instead: 1 x 128 scales on both operands, float32 out. With `cold` the launches
// rotate over copies of the inputs (>= 256 MB in all, 5x the L2, at most 64 copies), so that
// each finds its operands in DRAM as the JAX benchmark's rotated calls do; without it every
// launch reads the same, L2-resident inputs. With `tma` the row scales come by TMA at any M
// (the library asks for it above 128 rows only). With `groups=G` it runs the M-grouped
// (contiguous) GEMM: M rows in G groups, of sizes drawn in 0.7-1.3x of M / G and summing to
// M (the JAX benchmark's distribution, not its numbers), against G experts' [N, K] weights;
// with `masked=G`, G groups of an M-row buffer each, masked_m drawn in 0.7-1.0x of M; with
// `padded=G`, the same masked call with every group full (the "padded GEMM" of the MoE
// example). TFLOP/s count the rows in groups only, the tile count is the one the sizes make,
// and rows outside every group are not checked (the library zeroes them). The timed launches
// are queued behind a ~20 ms spin kernel, so that the host's launch cost (tensor maps,
// launch) never starves the GPU: the events time the kernels and the gaps between them.
// docs/PERF.md's v7 tile table comes from this tool; its older tables from a scratch
// predecessor (same kernels, same checks).
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/sm90_gemm_launch.cuh"

// TB_TILES(X) narrows the tiles built (and run): define it in a header given by -include.
#ifndef TB_TILES
#define TB_TILES FP8GEMM_SM90_TILES
#endif

namespace fp8gemm::sm90 {
TB_TILES(FP8GEMM_SM90_INSTANTIATE_TILE)  // (the library's are in sm90_tiles_*.cu)
}  // namespace fp8gemm::sm90

using namespace fp8gemm;
using namespace fp8gemm::sm90;

#define CHECK_CUDA(x)                                                                   \
  do {                                                                                  \
    cudaError_t e = (x);                                                                \
    if (e != cudaSuccess) {                                                             \
      std::printf("%s failed: %s\n", #x, cudaGetErrorString(e));                       \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

__device__ uint32_t hash(uint64_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
  h ^= h >> 13;
  h *= 0x5bd1e995;
  return h ^ (h >> 15);
}

__global__ void fill_fp8(uint8_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    __nv_fp8_e4m3 q(((hash(i, seed) & 0xffff) / 65536.0f - 0.5f) * 8.0f);
    p[i] = *reinterpret_cast<uint8_t*>(&q);
  }
}

__global__ void spin(int64_t cycles) {
  const int64_t start = clock64();
  while (clock64() - start < cycles) {
  }
}

__global__ void fill_scales(float* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    p[i] = 0.5f + (hash(i, seed) & 0xffff) / 65536.0f;
  }
}

// out[r, n] and sum |a b| * scales for the sampled rows, one thread per column.
__global__ void reference(const uint8_t* a, const uint8_t* b, const float* sa, const float* sb,
                          int64_t n, int64_t k, int64_t kb_count, const int* rows,
                          const int* experts, bool row_b, float* out, float* mag) {
  const int64_t row = rows[blockIdx.y];
  // Sampled row blockIdx.y belongs to expert experts[blockIdx.y]: its n rows of b and
  // ceil(n / 128) rows of block scales.
  b += experts[blockIdx.y] * n * k;
  sb += experts[blockIdx.y] * ceil_div(n, int64_t(128)) * kb_count;
  for (int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; col < n; col += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0, m = 0;
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      float part = 0, part_abs = 0;
      for (int64_t kk = kb * 128; kk < min(k, kb * 128 + 128); ++kk) {
        const float x = float(*reinterpret_cast<const __nv_fp8_e4m3*>(a + row * k + kk));
        const float y = float(*reinterpret_cast<const __nv_fp8_e4m3*>(b + col * k + kk));
        part += x * y;
        part_abs += fabsf(x * y);
      }
      const float scale = sa[row * kb_count + kb] * sb[(row_b ? col : col / 128) * kb_count + kb];
      acc += part * scale;
      m += part_abs * scale;
    }
    out[blockIdx.y * n + col] = acc;
    mag[blockIdx.y * n + col] = m;
  }
}

struct Bench {
  int64_t m, n, k, kb;
  // Grouped (groups > 0): a has a_rows rows; sizes (group_sizes or masked_m) on the device.
  int64_t groups = 0, a_rows = 0, useful_rows = 0;
  bool masked = false;
  std::vector<int> sizes;
  int* d_sizes = nullptr;
  int sms, iters;
  uint8_t *a, *b;  // copy 0 of the inputs (the one checked)
  float *sa, *sb, *ref, *mag;
  std::vector<uint8_t*> as, bs;  // every copy (cold: several)
  std::vector<float*> sas, sbs;
  void* out;  // bf16, or float32 (row)
  bool row_b, scale_tma;
  std::vector<int> rows;

  template <int BM, int BN, bool ROW>
  void run() {
    const int64_t experts = groups > 0 ? groups : 1;
    Operands ops{a, a_rows, b, experts * n, Fp8Format::kE4M3, Fp8Format::kE4M3, 128};
    GemmParams p{};
    p.m = m, p.n = n, p.k = k, p.sa = sa, p.sb = sb, p.sa_ld = kb, p.sb_ld = kb;
    p.tensor_scales = false, p.out = out, p.c = nullptr, p.out_f32 = ROW;
    // The library's choice (sm90_gemm.cu): by TMA above 128 rows (of a group).
    const int64_t group_rows = groups == 0 ? m : masked ? m : ceil_div(m, groups);
    p.sa_tma = p.sb_tma = group_rows > 128 || scale_tma;
    if (groups > 0) {
      p.sizes = d_sizes, p.masked = masked, p.groups = groups;
      p.sb_group_stride = ceil_div(n, int64_t(128)) * kb;
    }
    CHECK_CUDA(cudaMemset(out, 0xff, a_rows * n * (ROW ? 4 : 2)));  // poison
    auto launch = [&](size_t copy = 0) {
      ops.a = as[copy], ops.b = bs[copy], p.sa = sas[copy], p.sb = sbs[copy];
      ffi::Error err = launch_tile<BM, BN, ROW>(ops, p, nullptr, sms);
      if (err.failure()) std::printf("launch failed\n"), std::exit(1);
    };
    launch();
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<float> r(rows.size() * n), mg(rows.size() * n);
    std::vector<float> o(n);
    std::vector<__nv_bfloat16> o16(n);
    CHECK_CUDA(cudaMemcpy(r.data(), ref, r.size() * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(mg.data(), mag, mg.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (ROW) {
        CHECK_CUDA(cudaMemcpy(o.data(), static_cast<float*>(out) + rows[i] * n, n * 4,
                              cudaMemcpyDeviceToHost));
      } else {
        CHECK_CUDA(cudaMemcpy(o16.data(), static_cast<__nv_bfloat16*>(out) + rows[i] * n, n * 2,
                              cudaMemcpyDeviceToHost));
        for (int64_t c = 0; c < n; ++c) o[c] = __bfloat162float(o16[c]);
      }
      for (int64_t c = 0; c < n; ++c) {
        const double got = o[c], want = r[i * n + c];
        const double e = std::abs(got - want) / (std::abs(want) / 128 + mg[i * n + c] * 1e-3 + 1e-20);
        worst = std::isnan(e) ? INFINITY : std::max(worst, e);
      }
    }
    cudaEvent_t t0, t1;
    cudaEventCreate(&t0);
    cudaEventCreate(&t1);
    spin<<<1, 1>>>(int64_t(20) * 1000 * 1000 * 2);  // ~20 ms at 2 GHz
    cudaEventRecord(t0);
    for (int i = 0; i < iters; ++i) launch(i % as.size());
    cudaEventRecord(t1);
    CHECK_CUDA(cudaEventSynchronize(t1));
    float ms = 0;
    cudaEventElapsedTime(&ms, t0, t1);
    const double us = 1000.0 * ms / iters;
    int64_t row_tiles = ceil_div(m, int64_t(BM));
    if (groups > 0) {
      row_tiles = 0;
      for (int s : sizes) row_tiles += ceil_div(int64_t(s), int64_t(BM));
    }
    const int64_t tiles = row_tiles * ceil_div(n, int64_t(BN));
    std::printf("%6ld %6ld %6ld  %3dx%-3d  tiles %5ld (%.2f waves)  %9.1f us  %7.1f TFLOP/s  error %.2f %s\n",
                long(m), long(n), long(k), BM, BN, long(tiles), double(tiles) / sms, us,
                2.0 * useful_rows * n * k / (us * 1e-6) / 1e12, worst, worst <= 1 ? "ok" : "FAIL");
  }
};

int main(int argc, char** argv) {
  if (argc < 4) {
    std::printf("usage: %s M N K [\"tile tile ...\"] [iterations] [row] [cold] [tma] "
                "[groups=G | masked=G | padded=G] [seed=S]\n", argv[0]);
    return 2;
  }
  Bench bench{};
  bench.m = std::atoll(argv[1]), bench.n = std::atoll(argv[2]), bench.k = std::atoll(argv[3]);
  const std::string tiles = " " + std::string(argc > 4 ? argv[4] : "all") + " ";
  bench.iters = argc > 5 ? std::atoi(argv[5]) : 20;
  bool cold = false, padded = false;
  unsigned seed = 0;
  for (int i = 6; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](const char* key) {
      return arg.rfind(key, 0) == 0 ? std::atoll(arg.c_str() + std::strlen(key)) : 0;
    };
    bench.row_b |= arg == "row";
    cold |= arg == "cold";
    bench.scale_tma |= arg == "tma";
    if (int64_t g = value("groups=")) bench.groups = g;
    if (int64_t g = value("masked=")) bench.groups = g, bench.masked = true;
    if (int64_t g = value("padded=")) bench.groups = g, bench.masked = padded = true;
    if (int64_t v = value("seed=")) seed = unsigned(v);
  }
  if (bench.k % 16 != 0) return std::printf("K must be a multiple of 16\n"), 2;
  if (bench.groups > 0 && bench.row_b) return std::printf("grouped runs take no `row`\n"), 2;
  // Group sizes from the distribution of the JAX grouped benchmark's (_bench_grouped.py).
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> draw(0.7, bench.masked ? 1.0 : 1.3);
  const int64_t g_count = bench.groups;
  bench.a_rows = bench.masked ? g_count * bench.m : bench.m;
  bench.useful_rows = bench.groups > 0 ? 0 : bench.m;
  if (bench.masked) {
    for (int64_t g = 0; g < g_count; ++g) {
      bench.sizes.push_back(padded ? int(bench.m) : int(std::lround(draw(rng) * bench.m)));
    }
  } else if (g_count > 0) {
    std::vector<double> raw(g_count);
    double total = 0;
    for (double& r : raw) total += r = draw(rng);
    for (double r : raw) bench.sizes.push_back(int(std::floor(r / total * bench.m)));
    int64_t sum = 0;
    for (int s : bench.sizes) sum += s;
    *std::max_element(bench.sizes.begin(), bench.sizes.end()) += int(bench.m - sum);
  }
  for (int s : bench.sizes) bench.useful_rows += s;
  if (g_count > 0) {
    std::printf("group sizes:");
    for (int s : bench.sizes) std::printf(" %d", s);
    std::printf("\n");
    CHECK_CUDA(cudaMalloc(&bench.d_sizes, g_count * 4));
    CHECK_CUDA(cudaMemcpy(bench.d_sizes, bench.sizes.data(), g_count * 4, cudaMemcpyHostToDevice));
  }
  CHECK_CUDA(cudaDeviceGetAttribute(&bench.sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t n = bench.n, k = bench.k, kb = ceil_div(k, int64_t(128));
  const int64_t a_rows = bench.a_rows, experts = g_count > 0 ? g_count : 1;
  bench.kb = kb;
  const int64_t b_rows = experts * n;
  const int64_t sb_rows = bench.row_b ? n : experts * ceil_div(n, int64_t(128));
  CHECK_CUDA(cudaMalloc(&bench.a, a_rows * k));
  CHECK_CUDA(cudaMalloc(&bench.b, b_rows * k));
  CHECK_CUDA(cudaMalloc(&bench.sa, a_rows * kb * 4));
  CHECK_CUDA(cudaMalloc(&bench.sb, sb_rows * kb * 4));
  CHECK_CUDA(cudaMalloc(&bench.out, a_rows * n * 4));
  fill_fp8<<<1024, 256>>>(bench.a, a_rows * k, 1);
  fill_fp8<<<1024, 256>>>(bench.b, b_rows * k, 2);
  fill_scales<<<1024, 256>>>(bench.sa, a_rows * kb, 3);
  fill_scales<<<1024, 256>>>(bench.sb, sb_rows * kb, 4);
  const int64_t set_bytes = (a_rows + b_rows) * k + (a_rows + sb_rows) * kb * 4;
  const int64_t copies = cold ? std::min<int64_t>(64, ceil_div(int64_t(256) << 20, set_bytes)) : 1;
  bench.as = {bench.a}, bench.bs = {bench.b}, bench.sas = {bench.sa}, bench.sbs = {bench.sb};
  for (int64_t c = 1; c < copies; ++c) {
    uint8_t *a = nullptr, *b = nullptr;
    float *sa = nullptr, *sb = nullptr;
    CHECK_CUDA(cudaMalloc(&a, a_rows * k));
    CHECK_CUDA(cudaMalloc(&b, b_rows * k));
    CHECK_CUDA(cudaMalloc(&sa, a_rows * kb * 4));
    CHECK_CUDA(cudaMalloc(&sb, sb_rows * kb * 4));
    CHECK_CUDA(cudaMemcpy(a, bench.a, a_rows * k, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaMemcpy(b, bench.b, b_rows * k, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaMemcpy(sa, bench.sa, a_rows * kb * 4, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaMemcpy(sb, bench.sb, sb_rows * kb * 4, cudaMemcpyDeviceToDevice));
    bench.as.push_back(a), bench.bs.push_back(b), bench.sas.push_back(sa), bench.sbs.push_back(sb);
  }
  // The rows checked, and the expert whose weights each one multiplies: dense, rows at and
  // around the tile edges; grouped, each group's first two, middle and last rows.
  std::vector<int> experts_of;
  const auto sample = [&](int64_t r, int expert) {
    if (r < a_rows && std::find(bench.rows.begin(), bench.rows.end(), int(r)) == bench.rows.end()) {
      bench.rows.push_back(int(r));
      experts_of.push_back(expert);
    }
  };
  if (g_count == 0) {
    const int64_t m = bench.m;
    for (int64_t r : {int64_t(0), int64_t(1), int64_t(8), int64_t(63), int64_t(64), int64_t(127),
                      int64_t(128), int64_t(255), m / 2, m - 1}) {
      sample(r, 0);
    }
  }
  for (int64_t g = 0, start = 0; g < g_count; ++g) {
    const int64_t size = bench.sizes[g];
    if (bench.masked) start = g * bench.m;
    for (int64_t r : {int64_t(0), int64_t(1), size / 2, size - 1}) {
      if (r >= 0 && r < size) sample(start + r, int(g));
    }
    start += bench.masked ? 0 : size;
  }
  int *rows = nullptr, *experts_d = nullptr;
  CHECK_CUDA(cudaMalloc(&rows, bench.rows.size() * 4));
  CHECK_CUDA(cudaMalloc(&experts_d, bench.rows.size() * 4));
  CHECK_CUDA(cudaMalloc(&bench.ref, bench.rows.size() * n * 4));
  CHECK_CUDA(cudaMalloc(&bench.mag, bench.rows.size() * n * 4));
  CHECK_CUDA(cudaMemcpy(rows, bench.rows.data(), bench.rows.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(experts_d, experts_of.data(), experts_of.size() * 4, cudaMemcpyHostToDevice));
  reference<<<dim3(unsigned(ceil_div(n, int64_t(128))), unsigned(bench.rows.size())), 128>>>(
      bench.a, bench.b, bench.sa, bench.sb, n, k, kb, rows, experts_d, bench.row_b, bench.ref,
      bench.mag);
  CHECK_CUDA(cudaDeviceSynchronize());
#define RUN_TILE(BM, BN, ROW)                                                             \
  if (ROW == bench.row_b &&                                                               \
      (tiles == " all " || tiles.find(" " #BM "x" #BN " ") != std::string::npos)) {       \
    bench.run<BM, BN, ROW>();                                                             \
  }
  TB_TILES(RUN_TILE)
  return 0;
}
