// Hopper (sm_90a) FP8 GEMM with fine-grained scaling: TMA loads into a multi-stage
// shared-memory pipeline, one producer warpgroup and kMathWGs consumer warpgroups running
// wgmma, and per-block promotion of the partial sums into float32 registers (the DeepSeek-V3
// two-level accumulation). Persistent: one CTA per SM walks the tiles of a scheduler.
//
// out[m, n] = sum_kb sa(m, kb) * sb(n, kb) * (a @ b^T over K block kb); a [M, K] and b [N, K]
// K-major FP8. sa is [M, ceil(K/bs)] (row-major) or one per-tensor value; sb is
// [ceil(N/bs), ceil(K/bs)] or one value. A producer warp copies each stage's scales into
// shared memory beside its A and B tiles.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <type_traits>

#include "../common/problem.h"
#include "sm90_ptx.cuh"
#include "sm90_wgmma.cuh"

namespace fp8gemm::sm90 {

constexpr int kBlockK = 128;  // K per pipeline stage: one 128-byte swizzled row per tile row
constexpr int kWgThreads = 128;

struct GemmParams {
  int64_t m, n, k;
  const float* sa;     // [m, sa_ld] or a single value (tensor mode)
  const float* sb;     // [ceil(n / block), sb_ld] or a single value
  int64_t sa_ld, sb_ld;
  bool tensor_scales;
  void* out;           // [m, n], row-major
  const float* c;      // optional float32 accumulator [m, n] (may alias out)
  bool out_f32;
};

// Tile order: groups of kSwizzleN column blocks, walked M-major inside a group, so that the
// CTAs running at one time share a few A row blocks and a few B column blocks in L2.
template <int BLOCK_M, int BLOCK_N>
struct DenseScheduler {
  static constexpr int kSwizzleN = 16;
  int64_t m_blocks, n_blocks;

  __host__ __device__ DenseScheduler(int64_t m, int64_t n)
      : m_blocks(ceil_div(m, BLOCK_M)), n_blocks(ceil_div(n, BLOCK_N)) {}

  __host__ __device__ int64_t num_tiles() const { return m_blocks * n_blocks; }

  __device__ void tile(int64_t t, int64_t* m0, int64_t* n0) const {
    const int64_t group = t / (kSwizzleN * m_blocks);
    const int64_t first_n = group * kSwizzleN;
    const int64_t width = min(int64_t(kSwizzleN), n_blocks - first_n);
    const int64_t local = t - group * kSwizzleN * m_blocks;
    *m0 = local / width * BLOCK_M;
    *n0 = (first_n + local % width) * BLOCK_N;
  }
};

constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

template <int BLOCK_M, int BLOCK_N, int kStages, int kScaleBlock>
struct SharedStorage {
  // K blocks of the scales per stage: two when blocks are 64 wide, else one (a 256-wide
  // block covers two stages; both load it, the second promotes).
  static constexpr int kSubs = kScaleBlock < kBlockK ? kBlockK / kScaleBlock : 1;
  alignas(1024) uint8_t a[kStages][BLOCK_M * kBlockK];  // (BLOCK_M, 128) swizzled, per stage
  alignas(1024) uint8_t b[kStages][BLOCK_N * kBlockK];  // (BLOCK_N, 128) swizzled, per stage
  float sa[kStages][kSubs][BLOCK_M];  // a's scale of each tile row
  float sb[kStages][kSubs][4];        // b's scales of the (at most three) column blocks spanned
  uint64_t full[kStages];   // producer -> math: stage loaded (TMA bytes + 32 scale lanes)
  uint64_t empty[kStages];  // math -> producer: stage consumed
};

template <int BLOCK_M, int BLOCK_N, int kStages, int kScaleBlock, Fp8Format FA, Fp8Format FB>
struct GemmConfig {
  // Each math warpgroup owns 64 rows per wave; a 256-row tile takes two waves of the two
  // warpgroups, so each B tile in smem feeds four 64-row wgmmas.
  static constexpr int kMathWGs = BLOCK_M >= 128 ? 2 : 1;
  static constexpr int kWaves = BLOCK_M / (64 * kMathWGs);
  static constexpr int kThreads = kWgThreads * (1 + kMathWGs);
  static constexpr int kAcc = BLOCK_N / 2;  // float accumulators per thread (m64nN)
  using Storage = SharedStorage<BLOCK_M, BLOCK_N, kStages, kScaleBlock>;
  static constexpr int kSubs = Storage::kSubs;
  static constexpr int kStagesPerScale = kScaleBlock > kBlockK ? kScaleBlock / kBlockK : 1;
  // Stages summed in the partial accumulator before one promotion: a 256-wide block spans
  // two. Tiles of two waves reuse one partial accumulator for both (two would not fit in
  // the registers), so they promote every stage, with the block's scales: more often than
  // the contract asks, which only adds precision.
  static constexpr int kStagesPerPromotion = kWaves > 1 ? 1 : kStagesPerScale;
  static constexpr int kStepsPerSub = kBlockK / 32 / kSubs;  // wgmma k32 steps per sub-block
  static constexpr uint32_t kStageBytes = (BLOCK_M + BLOCK_N) * kBlockK;
  // Where a tile starts inside a column block of b's scales (n0 % kScaleBlock) decides which
  // accumulators take which scale. It is one of kScaleBlock / gcd values; the mainloop is
  // compiled once per value so that the choice is a compile-time constant, except when it
  // cannot matter (a tile inside one block, or tiles aligned with blocks).
  static constexpr bool kOneOffset = kScaleBlock % BLOCK_N == 0 || BLOCK_N % kScaleBlock == 0;
  static constexpr int kOffsetStep = kOneOffset ? kScaleBlock : gcd(BLOCK_N, kScaleBlock);
  // Producer registers go to the math warpgroups (setmaxnreg); totals stay within 64K.
  static constexpr int kProducerRegs = 40;
  static constexpr int kMathRegs = kMathWGs == 2 ? 232 : 240;

  static_assert(BLOCK_M == 64 || BLOCK_M == 128 || BLOCK_M == 256, "waves of 64-row wgmmas");
  static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "wgmma N: multiple of 16 up to 256");
  static_assert(kScaleBlock == 64 || kScaleBlock == 128 || kScaleBlock == 256,
                "scale blocks of 64, 128 or 256");
  static_assert(kScaleBlock - kOffsetStep + BLOCK_N <= 3 * kScaleBlock || kOneOffset,
                "a tile spans at most three column blocks of b's scales");
  static_assert(BLOCK_N <= 3 * kScaleBlock, "a tile spans at most three column blocks");
  static_assert(kAcc * (kWaves + 1) <= 200, "accumulators must fit in the math registers");
  static_assert(kProducerRegs * kWgThreads + kMathRegs * kWgThreads * kMathWGs <= 65536,
                "register file");
};

// Calls f(std::integral_constant<int, offset>) with the run-time offset made a constant
// (one of kStep, 2 kStep, ... below kEnd).
template <int kOffset, int kStep, int kEnd, class F>
__device__ __forceinline__ void dispatch_offset(int offset, F&& f) {
  if constexpr (kOffset + kStep >= kEnd) {
    f(std::integral_constant<int, kOffset>{});
  } else {
    if (offset == kOffset) {
      f(std::integral_constant<int, kOffset>{});
    } else {
      dispatch_offset<kOffset + kStep, kStep, kEnd>(offset, f);
    }
  }
}

template <class Cfg, int BLOCK_M, int BLOCK_N, int kStages, int kScaleBlock, Fp8Format FA,
          Fp8Format FB>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    sm90_fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                         const __grid_constant__ CUtensorMap map_b, GemmParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Storage = typename Cfg::Storage;
  constexpr int kSubs = Cfg::kSubs;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);

  const int wg = threadIdx.x / kWgThreads;
  const int tid = threadIdx.x % kWgThreads;
  const int warp = tid / 32, lane = tid % 32;
  const int64_t k_stages = ceil_div(p.k, kBlockK);
  const int64_t sa_blocks = ceil_div(p.k, kScaleBlock);
  const DenseScheduler<BLOCK_M, BLOCK_N> sched(p.m, p.n);

  if (threadIdx.x == 0) {
    tma_prefetch_desc(&map_a);
    tma_prefetch_desc(&map_b);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&smem.full[s], 1 + 32);              // the TMA thread and the 32 scale lanes
      mbar_init(&smem.empty[s], Cfg::kMathWGs * kWgThreads);  // every math thread
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == Cfg::kMathWGs) {
    // ---- Producer warpgroup: warp 0's first thread streams the A and B tiles by TMA;
    // warp 1 copies the stage's scales next to them (cp.async), so that the math
    // warpgroups read every scale from shared memory. ----
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (warp > 1 || (warp == 0 && lane != 0)) return;
    int64_t it = 0;
    for (int64_t t = blockIdx.x; t < sched.num_tiles(); t += gridDim.x) {
      int64_t m0, n0;
      sched.tile(t, &m0, &n0);
      const int64_t nb_first = n0 / kScaleBlock;
      const int64_t nb_last = (min(n0 + BLOCK_N, p.n) - 1) / kScaleBlock;
      for (int64_t ks = 0; ks < k_stages; ++ks, ++it) {
        const int s = it % kStages;
        mbar_wait(&smem.empty[s], ((it / kStages) & 1) ^ 1);
        if (warp == 0) {
          mbar_arrive_expect_tx(&smem.full[s], Cfg::kStageBytes);
          tma_load_2d(&map_a, &smem.full[s], smem.a[s], ks * kBlockK, m0);
          tma_load_2d(&map_b, &smem.full[s], smem.b[s], ks * kBlockK, n0);
          continue;
        }
#pragma unroll
        for (int sub = 0; sub < kSubs; ++sub) {
          // A K tail can leave a 64-wide sub-block empty: its (clamped) scale is never used.
          const int64_t kb = min((ks * kBlockK + sub * (kBlockK / kSubs)) / kScaleBlock,
                                 sa_blocks - 1);
          // Rows past M take the last row's scale: they are computed, never stored.
#pragma unroll
          for (int r = lane; r < BLOCK_M; r += 32) {
            const int64_t row = min(m0 + r, p.m - 1);
            cp_async_4(&smem.sa[s][sub][r], p.sa + (p.tensor_scales ? 0 : row * p.sa_ld + kb));
          }
          if (lane < 3) {
            const int64_t nb = min(nb_first + lane, nb_last);
            cp_async_4(&smem.sb[s][sub][lane], p.sb + (p.tensor_scales ? 0 : nb * p.sb_ld + kb));
          }
        }
        cp_async_mbar_arrive(&smem.full[s]);
      }
    }
    return;
  }

  // ---- Math warpgroups: wgmma on each stage, promotion at each scale block's end. ----
  setmaxnreg_inc<Cfg::kMathRegs>();
  // Row of accumulator 0 in wave w: w * 64 * kMathWGs + row_in_wave (and + 8).
  const int row_in_wave = wg * 64 + warp * 16 + lane / 4;
  constexpr int kWaveRows = 64 * Cfg::kMathWGs;
  float partial[Cfg::kAcc];
  float acc[Cfg::kWaves][Cfg::kAcc];
  int64_t it = 0;

  for (int64_t t = blockIdx.x; t < sched.num_tiles(); t += gridDim.x) {
    int64_t m0, n0;
    sched.tile(t, &m0, &n0);
#pragma unroll
    for (int w = 0; w < Cfg::kWaves; ++w)
#pragma unroll
      for (int i = 0; i < Cfg::kAcc; ++i) acc[w][i] = 0.0f;

    dispatch_offset<0, Cfg::kOffsetStep, kScaleBlock>(
        static_cast<int>(n0 % kScaleBlock), [&](auto offset) {
          constexpr int kOffset = Cfg::kOneOffset ? 0 : decltype(offset)::value;
          for (int64_t ks = 0; ks < k_stages; ++ks, ++it) {
            const int s = it % kStages;
            mbar_wait(&smem.full[s], (it / kStages) & 1);
#pragma unroll
            for (int sub = 0; sub < kSubs; ++sub) {
              const int64_t kb = (ks * kBlockK + sub * (kBlockK / kSubs)) / kScaleBlock;
              const bool first = (ks % Cfg::kStagesPerPromotion) == 0;
              const bool last =
                  (ks % Cfg::kStagesPerPromotion) == Cfg::kStagesPerPromotion - 1 ||
                  ks == k_stages - 1;
              const bool promote = last && kb < sa_blocks;
              const float sb0 = smem.sb[s][sub][0], sb1 = smem.sb[s][sub][1],
                          sb2 = smem.sb[s][sub][2];
#pragma unroll
              for (int w = 0; w < Cfg::kWaves; ++w) {
                // Every shared-memory read of the stage comes before the empty arrive below.
                const float sa0 = smem.sa[s][sub][w * kWaveRows + row_in_wave];
                const float sa1 = smem.sa[s][sub][w * kWaveRows + row_in_wave + 8];
                const uint8_t* a_tile = smem.a[s] + (w * kWaveRows + wg * 64) * kBlockK;
#pragma unroll
                for (int i = 0; i < Cfg::kAcc; ++i) fence_operand(partial[i]);
                wgmma_fence();
#pragma unroll
                for (int step = 0; step < Cfg::kStepsPerSub; ++step) {
                  const int k_byte = (sub * Cfg::kStepsPerSub + step) * 32;
                  const uint64_t da = smem_desc_kmajor_sw128(a_tile) + (k_byte >> 4);
                  const uint64_t db = smem_desc_kmajor_sw128(smem.b[s]) + (k_byte >> 4);
                  Wgmma<BLOCK_N, FA, FB>::mma(da, db, partial, !(first && step == 0));
                }
                wgmma_commit();
                wgmma_wait<0>();
#pragma unroll
                for (int i = 0; i < Cfg::kAcc; ++i) fence_operand(partial[i]);
                if (sub == kSubs - 1 && w == Cfg::kWaves - 1) {
                  // The stage has been read. Every thread arrives: an arrive releases only
                  // its own thread's reads of the scales (one arrive per warp after
                  // __syncwarp left racecheck reporting the producer's next writes).
                  mbar_arrive(&smem.empty[s]);
                }
                if (promote) {
                  // Accumulator i of m64nN sits at row +8 when i % 4 >= 2 and at tile
                  // column 8 * (i / 4) + 2 * (lane % 4) + i % 2; its b scale is that of
                  // the column block holding tile column 8 * (i / 4) (8-column groups never
                  // straddle a block: tiles and blocks are multiples of 16 wide).
                  const float s00 = sa0 * sb0, s01 = sa0 * sb1, s02 = sa0 * sb2;
                  const float s10 = sa1 * sb0, s11 = sa1 * sb1, s12 = sa1 * sb2;
#pragma unroll
                  for (int i = 0; i < Cfg::kAcc; ++i) {
                    const int blk = (kOffset + 8 * (i / 4)) / kScaleBlock;
                    const float scale = (i % 4) >= 2
                                            ? (blk == 0 ? s10 : (blk == 1 ? s11 : s12))
                                            : (blk == 0 ? s00 : (blk == 1 ? s01 : s02));
                    acc[w][i] = fmaf(partial[i], scale, acc[w][i]);
                  }
                }
              }
            }
          }
        });

    // Epilogue: registers straight to global memory, two columns per store.
#pragma unroll
    for (int w = 0; w < Cfg::kWaves; ++w) {
#pragma unroll
      for (int i = 0; i < Cfg::kAcc; i += 2) {
        const int64_t row = m0 + w * kWaveRows + row_in_wave + ((i % 4) >= 2 ? 8 : 0);
        const int64_t col = n0 + 8 * (i / 4) + 2 * (lane % 4);
        if (row >= p.m || col >= p.n) continue;
        const int64_t idx = row * p.n + col;
        const bool pair = col + 1 < p.n && (p.n % 2 == 0);
        const float v0 = acc[w][i], v1 = acc[w][i + 1];
        if (p.out_f32) {
          float* out = static_cast<float*>(p.out);
          // c may alias out: each element is read here, then written by this same thread.
          const float o0 = p.c ? v0 + p.c[idx] : v0;
          if (pair) {
            *reinterpret_cast<float2*>(out + idx) = make_float2(o0, p.c ? v1 + p.c[idx + 1] : v1);
          } else {
            out[idx] = o0;
            if (col + 1 < p.n) out[idx + 1] = p.c ? v1 + p.c[idx + 1] : v1;
          }
        } else {
          __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
          if (pair) {
            *reinterpret_cast<__nv_bfloat162*>(out + idx) = __floats2bfloat162_rn(v0, v1);
          } else {
            out[idx] = __float2bfloat16_rn(v0);
            if (col + 1 < p.n) out[idx + 1] = __float2bfloat16_rn(v1);
          }
        }
      }
    }
  }
#endif
}

}  // namespace fp8gemm::sm90
