// Hopper (sm_90a) FP8 GEMM with fine-grained scaling: TMA loads into a multi-stage
// shared-memory pipeline, one producer warpgroup and kMathWGs consumer warpgroups running
// wgmma, and per-block promotion of the partial sums into float32 registers (the DeepSeek-V3
// two-level accumulation). Persistent: one CTA per SM walks the tiles of a scheduler.
//
// out[m, n] = sum_kb sa(m, kb) * sb(n, kb) * (a @ b^T over K block kb); a [M, K] and b [N, K]
// K-major FP8. sa is [M, ceil(K/bs)] (row-major) or one per-tensor value; sb is
// [ceil(N/bs), ceil(K/bs)] (block scales), [N, ceil(K/bs)] (row scales, kRowB: the weight
// gradient's 1D1D form) or one value. Each stage's scales arrive by TMA beside its A and B
// tiles, as 16-byte boxes of four K blocks per row (a's rows, b's rows or the three column
// blocks b's tile can span), when their layout allows it (rows 16-byte aligned); otherwise,
// and for per-tensor scales, a producer warp copies them (cp.async). The math warps read
// every scale from shared memory.
//
// The same kernel runs the M-grouped GEMMs of Mixture-of-Experts: the scheduler maps each
// tile to a group (reading the group sizes on the device), a tile never crosses a group's
// rows, and b's rows and scales are those of the group's expert (Scheduler below). And the
// k-grouped weight gradient: each group sums its own range of K (its tokens) into its own
// output; the stages at the range's ends have the other groups' tokens zeroed in shared
// memory before the wgmmas read them.
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
  int64_t m, n, k;     // dense: a is [m, k]; grouped: m rows per batch entry (contiguous)
                       // or per group (masked), see below
  const float* sa;     // [rows, sa_ld] or a single value (tensor mode; one per group if grouped)
  const float* sb;     // [ceil(n / block) or n, sb_ld] or a single value (per expert if grouped)
  int64_t sa_ld, sb_ld;
  bool tensor_scales;
  void* out;           // [rows, n], row-major
  const float* c;      // optional float32 accumulator [m, n] (may alias out; dense only)
  bool out_f32;
  // M-grouped (sizes != nullptr): a is x [batch * rows_per_batch, k] with the rows of
  // group (b, g) at b * m + (sizes of the earlier groups) (contiguous) or at (b * groups +
  // g) * m (masked: the first sizes[b, g] of them); b is w [weight_batch * groups * n, k].
  const int32_t* sizes = nullptr;  // [batch, groups] on the device
  bool masked = false;
  int64_t batch = 1, groups = 1, weight_batch = 1;
  int64_t sb_group_stride = 0;     // floats between two experts' block scales
  // K-grouped (k_sizes != nullptr; the 1D1D form): a is [batch * m, k] and b [batch * n,
  // k]; group (b, g) sums K range [sizes of the earlier groups of b, + sizes[b, g]) (cut at
  // k) into out rows [(b * groups + g) * m, + m), accumulating c's same rows when given.
  const int32_t* k_sizes = nullptr;  // [batch, groups] on the device
  // Scales loaded by TMA: a's rows (sa_tma) and b's rows or blocks (sb_tma). The host asks
  // for it, and the launch keeps it where the scale rows are 16-byte aligned.
  bool sa_tma = false, sb_tma = false;
};

// One output tile: rows [row0, row0 + rows) of a, stored at out rows [out_row0, + rows)
// (rows <= BLOCK_M: the rest of the tile lies past M or in the next group, and is computed
// but not stored), columns [n0, n0 + BLOCK_N) of the expert whose rows of b start at
// b_row0 - n0, summed over K range [k0, k1) in stages [ks_begin, ks_end) of kBlockK.
struct TileCoord {
  int64_t row0, out_row0;
  int rows;
  int64_t n0, b_row0;
  int expert;  // b's expert (0 unless M-grouped): the row of its block scales' TMA map
  int64_t k0, k1, ks_begin, ks_end;
  const float* sa;  // tensor mode: the group's scale; else a's scales (global rows)
  const float* sb;  // the expert's scales
};

__device__ __forceinline__ int64_t warp_inclusive_sum(int64_t v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int64_t u = __shfl_up_sync(~0u, v, d);
    if (lane >= d) v += u;
  }
  return v;
}

// The groups of an M-grouped GEMM, in order, each with its row range and its number of
// BLOCK_M-row tiles. find() walks them 32 at a time, one group per lane of the calling warp
// (all 32 lanes must call it together), until the group holding row tile `mt`; the sizes
// follow the library's policy (common/problem.h): negative counts as 0, rows past the end
// are cut. Returns false, with *total the number of row tiles of all groups, past the last.
template <int BLOCK_M>
struct GroupWalk {
  int64_t begin, rows;  // the group's rows of a and out: [begin, begin + rows)
  int64_t first_tile;   // row tiles of all earlier groups
  int64_t q;            // b * groups + g

  __device__ static bool find(const GemmParams& p, int64_t mt, GroupWalk* out, int64_t* total) {
    const int lane = threadIdx.x % 32;
    // Contiguous groups start after the earlier groups of their batch entry (a segment);
    // masked groups have fixed rows, so all of them form one segment.
    const int64_t segments = p.masked ? 1 : p.batch;
    const int64_t per_segment = p.masked ? p.batch * p.groups : p.groups;
    int64_t tiles_before = 0;
    for (int64_t seg = 0; seg < segments; ++seg) {
      int64_t offset = 0;  // rows of the segment's earlier groups (uncut)
      for (int64_t i0 = 0; i0 < per_segment; i0 += 32) {
        const int64_t i = i0 + lane, q = seg * per_segment + i;
        const bool in = i < per_segment;
        const int64_t size = in ? max(__ldg(p.sizes + q), 0) : 0;
        int64_t begin, rows;
        if (p.masked) {
          begin = q * p.m;
          rows = min(size, p.m);
        } else {
          const int64_t end = offset + warp_inclusive_sum(size);
          begin = min(end - size, p.m);
          rows = min(end, p.m) - begin;
          begin += seg * p.m;
          offset = __shfl_sync(~0u, end, 31);
        }
        const int64_t tiles = (rows + BLOCK_M - 1) / BLOCK_M;
        const int64_t tiles_end = tiles_before + warp_inclusive_sum(tiles);
        const unsigned hit = __ballot_sync(~0u, in && mt < tiles_end);
        if (hit) {
          const int src = __ffs(hit) - 1;
          out->begin = __shfl_sync(~0u, begin, src);
          out->rows = __shfl_sync(~0u, rows, src);
          out->first_tile = __shfl_sync(~0u, tiles_end - tiles, src);
          out->q = __shfl_sync(~0u, q, src);
          return true;
        }
        tiles_before = __shfl_sync(~0u, tiles_end, 31);
      }
    }
    *total = tiles_before;
    return false;
  }
};

// K range [*k0, *k1) of k-grouped group q = b * groups + g: after the earlier groups of
// batch entry b, cut at p.k (the policy of common/problem.h's group_rows). The whole warp
// calls it; it sums the earlier sizes 32 at a time, one group per lane.
__device__ __forceinline__ void k_group_range(const GemmParams& p, int q, int64_t* k0,
                                              int64_t* k1) {
  const int lane = threadIdx.x % 32;
  const int groups = static_cast<int>(p.groups);
  const int b = q / groups, g = q % groups;
  const int32_t* sizes = p.k_sizes + int64_t(b) * groups;
  int64_t offset = 0;
  for (int i0 = 0; i0 < g; i0 += 32) {
    const int i = i0 + lane;
    const int64_t size = i < g ? max(__ldg(sizes + i), 0) : 0;
    offset += __shfl_sync(~0u, warp_inclusive_sum(size), 31);
  }
  const int64_t size = max(__ldg(sizes + g), 0);
  *k0 = min(offset, p.k);
  *k1 = min(offset + size, p.k);
}

// Tile order: groups of kSwizzleN column blocks, walked M-major inside a group, so that the
// CTAs running at one time share a few A row blocks and a few B column blocks in L2. The
// row blocks are the dense GEMM's, or the row tiles of all groups in order (a group's last
// tile may be partial; the next group starts a new tile), or (k-grouped) the dense row
// blocks of every group's output, group after group. Both the constructor and tile() must
// be called by whole warps (the group walks are warp-cooperative). M-grouped GEMMs have block
// scales or per-tensor ones, k-grouped ones row scales (kRowB): each kernel compiles the
// one walk it can meet (both in one kernel spilled the producer's 40 registers). Tile
// numbers are 32-bit (the host keeps the count below 2^31, tile_count_fits): every warp
// maps a tile at each tile's start, and 64-bit divisions there cost the short-K shapes.
template <int BLOCK_M, int BLOCK_N, bool kRowB>
struct Scheduler {
  static constexpr int kSwizzleN = 16;
  int m_blocks, n_blocks;  // 32 bits: the math warps keep them through the mainloop

  // Dense (the host sizes the grid with it; k-grouped: per group).
  __host__ __device__ static int64_t dense_tiles(int64_t m, int64_t n) {
    return ceil_div(m, BLOCK_M) * ceil_div(n, BLOCK_N);
  }

  __device__ explicit Scheduler(const GemmParams& p)
      : n_blocks(static_cast<int>(ceil_div(p.n, BLOCK_N))) {
    int64_t blocks = ceil_div(p.m, BLOCK_M);
    if constexpr (kRowB) {
      if (p.k_sizes != nullptr) blocks *= p.batch * p.groups;
    } else if (p.sizes != nullptr) {
      GroupWalk<BLOCK_M> unused;
      GroupWalk<BLOCK_M>::find(p, INT64_MAX, &unused, &blocks);
    }
    m_blocks = static_cast<int>(blocks);
  }

  __device__ int num_tiles() const { return m_blocks * n_blocks; }

  __device__ TileCoord tile(const GemmParams& p, int t) const {
    // A group's tiles: min(kSwizzleN, n_blocks) * m_blocks <= num_tiles() (one group
    // when there are fewer column blocks), so the product stays in 32 bits.
    const int span = min(kSwizzleN, n_blocks) * m_blocks;
    const int group = t / span;
    const int first_n = group * kSwizzleN;
    const int width = min(kSwizzleN, n_blocks - first_n);
    const int local = t - group * span;
    const int mt = local / width;
    TileCoord c;
    c.n0 = int64_t(first_n + local % width) * BLOCK_N;
    c.expert = 0;
    c.k0 = 0;
    c.k1 = p.k;
    if (kRowB && p.k_sizes != nullptr) {
      const int per_group = static_cast<int>(ceil_div(p.m, BLOCK_M));
      const int q = mt / per_group, b = q / static_cast<int>(p.groups);  // group, batch entry
      const int64_t local_row0 = int64_t(mt - q * per_group) * BLOCK_M;
      c.row0 = b * p.m + local_row0;
      c.out_row0 = q * p.m + local_row0;
      c.rows = static_cast<int>(min(int64_t(BLOCK_M), p.m - local_row0));
      c.b_row0 = b * p.n + c.n0;
      c.sa = p.sa;
      c.sb = p.sb + b * p.n * p.sb_ld;  // the producer's copies index b's scales by column
      k_group_range(p, q, &c.k0, &c.k1);
    } else if (kRowB || p.sizes == nullptr) {
      c.row0 = int64_t(mt) * BLOCK_M;
      c.out_row0 = c.row0;
      c.rows = static_cast<int>(min(int64_t(BLOCK_M), p.m - c.row0));
      c.b_row0 = c.n0;
      c.sa = p.sa;
      c.sb = p.sb;
    } else {
      GroupWalk<BLOCK_M> gw;
      int64_t unused;
      GroupWalk<BLOCK_M>::find(p, mt, &gw, &unused);  // mt < m_blocks: always found
      const int64_t b = gw.q / p.groups, g = gw.q % p.groups;
      const int64_t expert = (p.weight_batch == 1 ? 0 : b) * p.groups + g;
      c.row0 = gw.begin + (mt - gw.first_tile) * BLOCK_M;
      c.out_row0 = c.row0;
      c.rows = static_cast<int>(min(int64_t(BLOCK_M), gw.begin + gw.rows - c.row0));
      c.b_row0 = expert * p.n + c.n0;
      c.expert = static_cast<int>(expert);
      c.sa = p.tensor_scales ? p.sa + gw.q : p.sa;
      c.sb = p.tensor_scales ? p.sb + expert : p.sb + expert * p.sb_group_stride;
    }
    // The stages holding [k0, k1); an empty range has none (the tile stores zeros, or c).
    c.ks_begin = c.k0 / kBlockK;
    c.ks_end = c.k1 > c.k0 ? ceil_div(c.k1, kBlockK) : c.ks_begin;
    return c;
  }
};

constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

template <int BLOCK_M, int BLOCK_N, int kStages, int kScaleBlock, bool kRowB>
struct SharedStorage {
  // K blocks of the scales per stage: two when blocks are 64 wide, else one (a 256-wide
  // block covers two stages; both load it, the second promotes).
  static constexpr int kSubs = kScaleBlock < kBlockK ? kBlockK / kScaleBlock : 1;
  alignas(1024) uint8_t a[kStages][BLOCK_M * kBlockK];  // (BLOCK_M, 128) swizzled, per stage
  alignas(1024) uint8_t b[kStages][BLOCK_N * kBlockK];  // (BLOCK_N, 128) swizzled, per stage
  // Row scales, per stage: [row][kb % 4] holds the scale of K block kb (a TMA box is the
  // row's four K blocks from a multiple of four on: the one or two of the stage among them).
  alignas(128) float sa[kStages][BLOCK_M][4];
  // b's scales, laid out as sa: of every column (kRowB), or of the (at most three) column
  // blocks the tile spans from its first on ([j][kb % 4]: block nb_first + j; eight rows
  // keep each stage's box 128-byte aligned for TMA).
  alignas(128) float sb[kStages][kRowB ? BLOCK_N : 8][4];
  // Each math warp parks its tile's origin here through the mainloop (registers are full).
  struct Origin {
    int64_t row0, n0;  // out's
    int64_t k0, k1;    // the K range (read at its first and last stage)
    int rows;
  } origin[8];
  uint64_t full[kStages];   // producer -> math: stage loaded (TMA bytes [+ 32 scale lanes])
  uint64_t empty[kStages];  // math -> producer: stage consumed
};

template <int BLOCK_M, int BLOCK_N, int kStages, int kScaleBlock, bool kRowB_, Fp8Format FA,
          Fp8Format FB>
struct GemmConfig {
  static constexpr bool kRowB = kRowB_;  // b's scales per row (1D1D), not per 128 x 128 block
  static constexpr int kBlockM = BLOCK_M, kBlockN = BLOCK_N, kStageCount = kStages;
  static constexpr Fp8Format kFormatA = FA, kFormatB = FB;
  // Each math warpgroup owns 64 rows per wave; a 256-row tile takes two waves of the two
  // warpgroups, so each B tile in smem feeds four 64-row wgmmas.
  static constexpr int kMathWGs = BLOCK_M >= 128 ? 2 : 1;
  static constexpr int kWaves = BLOCK_M / (64 * kMathWGs);
  static constexpr int kThreads = kWgThreads * (1 + kMathWGs);
  static constexpr int kAcc = BLOCK_N / 2;  // float accumulators per thread (m64nN)
  using Storage = SharedStorage<BLOCK_M, BLOCK_N, kStages, kScaleBlock, kRowB>;
  static constexpr int kSubs = Storage::kSubs;
  static constexpr int kStagesPerScale = kScaleBlock > kBlockK ? kScaleBlock / kBlockK : 1;
  // Stages summed in the partial accumulator before one promotion: a 256-wide block spans
  // two. Tiles of two waves reuse one partial accumulator for both (two would not fit in
  // the registers), so they promote every stage, with the block's scales: more often than
  // the contract asks, which only adds precision.
  static constexpr int kStagesPerPromotion = kWaves > 1 ? 1 : kStagesPerScale;
  static constexpr int kStepsPerSub = kBlockK / 32 / kSubs;  // wgmma k32 steps per sub-block
  static constexpr uint32_t kStageBytes = (BLOCK_M + BLOCK_N) * kBlockK;
  // One warpgroup, one wave, 128-wide blocks, at most 128 columns: the mainloop keeps two
  // partial accumulators and issues stage ks + 1's wgmmas before it promotes stage ks
  // (pipelined_mainloop), so that the tensor core has a stage queued while the warpgroup
  // promotes and waits on the next barrier. The other tiles have no registers for a second
  // partial sum (two waves or two warpgroups already overlap one stage's promotion with
  // the other's wgmmas).
  static constexpr bool kPipelined = kMathWGs == 1 && kWaves == 1 && !kRowB &&
                                     kScaleBlock == kBlockK && BLOCK_N <= 128;
  // Where a tile starts inside a column block of b's scales (n0 % kScaleBlock) decides which
  // accumulators take which scale. It is one of kScaleBlock / gcd values; the mainloop is
  // compiled once per value so that the choice is a compile-time constant, except when it
  // cannot matter (a tile inside one block, tiles aligned with blocks, or row scales).
  static constexpr bool kOneOffset =
      kRowB || kScaleBlock % BLOCK_N == 0 || BLOCK_N % kScaleBlock == 0;
  static constexpr int kOffsetStep = kOneOffset ? kScaleBlock : gcd(BLOCK_N, kScaleBlock);
  // Producer registers go to the math warpgroups (setmaxnreg); totals stay within 64K.
  // Two math warpgroups leave the producer 40; with one there is room for more.
  static constexpr int kProducerRegs = kMathWGs == 2 ? 40 : 56;
  static constexpr int kMathRegs = kMathWGs == 2 ? 232 : 240;

  static_assert(BLOCK_M == 64 || BLOCK_M == 128 || BLOCK_M == 256, "waves of 64-row wgmmas");
  static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "wgmma N: multiple of 16 up to 256");
  static_assert(kScaleBlock == 64 || kScaleBlock == 128 || kScaleBlock == 256,
                "scale blocks of 64, 128 or 256");
  static_assert(kScaleBlock - kOffsetStep + BLOCK_N <= 3 * kScaleBlock || kOneOffset,
                "a tile spans at most three column blocks of b's scales");
  static_assert(BLOCK_N <= 3 * kScaleBlock, "a tile spans at most three column blocks");
  static_assert(kAcc * (kWaves + 1) <= 200, "accumulators must fit in the math registers");
  // setmaxnreg.inc waits until the CTA's registers allow it: what the warpgroups ask for
  // must fit in what the CTA got at launch (at most 64K / kThreads each, in steps of 8).
  static_assert(kProducerRegs * kWgThreads + kMathRegs * kWgThreads * kMathWGs <=
                    65536 / kThreads / 8 * 8 * kThreads,
                "the warpgroups' registers exceed the CTA's (setmaxnreg would wait forever)");
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

__device__ __forceinline__ uint32_t bf16x2_bits(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Transposes the 4 x 4 matrix held by a quad of lanes (lane q holds row q in v): afterwards
// lane q holds column q, v[k] coming from lane k. Two exchanges of two values each.
__device__ __forceinline__ void quad_transpose(uint32_t (&v)[4], int q) {
#pragma unroll
  for (int mask = 2; mask >= 1; mask /= 2) {
    const bool upper = q & mask;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k & mask) continue;  // pairs (k, k + mask)
      const uint32_t sent = upper ? v[k] : v[k + mask];
      const uint32_t got = __shfl_xor_sync(~0u, sent, mask);
      if (upper) {
        v[k] = got;
      } else {
        v[k + mask] = got;
      }
    }
  }
}

// Zeroes the K columns of one stage's A and B tiles that lie outside [lo, hi) (the range's
// columns in the stage, clamped to [0, kBlockK) here): a k-grouped range's first and last
// stages also hold the neighbouring groups' tokens, which must add nothing (zeroing both
// operands keeps a NaN or Inf there out of the sum too). All math threads call it (thread
// is their index among them); the tiles are rows of 128 bytes whose 16-byte chunks are
// permuted by the 128-byte swizzle (chunk c of row r at c ^ (r % 8)). The writes are made
// visible to the wgmmas (the async proxy) before it returns.
template <class Cfg>
__device__ __forceinline__ void zero_outside(uint8_t* a, uint8_t* b, int64_t lo64, int64_t hi64,
                                             int thread) {
  constexpr int kRowsA = Cfg::kBlockM, kRows = Cfg::kBlockM + Cfg::kBlockN;
  constexpr int kThreads = Cfg::kMathWGs * kWgThreads;
  const int lo = static_cast<int>(max(lo64, int64_t(0)));
  const int hi = static_cast<int>(min(hi64, int64_t(kBlockK)));
  if (lo == 0 && hi == kBlockK) return;  // uniform: the whole stage is the range's
  for (int i = thread; i < kRows * 8; i += kThreads) {
    const int r = i / 8, c = i % 8;
    const int first = c * 16;  // the chunk's K columns: [first, first + 16)
    if (first >= lo && first + 16 <= hi) continue;
    uint8_t* row = r < kRowsA ? a + r * kBlockK : b + (r - kRowsA) * kBlockK;
    uint4* chunk = reinterpret_cast<uint4*>(row + ((c ^ (r % 8)) << 4));
    uint4 v = make_uint4(0, 0, 0, 0);
    if (first + 16 > lo && first < hi) {  // partly inside: keep its bytes in [lo, hi)
      v = *chunk;
      uint32_t* words = &v.x;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        uint32_t keep = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = first + 4 * w + j;
          if (col >= lo && col < hi) keep |= 0xffu << (8 * j);
        }
        words[w] &= keep;
      }
    }
    *chunk = v;
  }
  fence_async_smem();
  named_barrier_sync(1, kThreads);
}

// A stage's place in the ring of kStages buffers, and the parity of the ring's lap (the
// phase an mbarrier wait expects).
template <int kStages>
struct PipelineState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void advance() {
    if (++stage == kStages) stage = 0, phase ^= 1;
  }
};

// The mainloop of the one-warpgroup tiles (Cfg::kPipelined): stage ks's wgmmas accumulate
// into part[ks % 2]; after issuing them, the warpgroup waits for stage ks - 1's (wgmma
// wait_group 1), releases that stage and promotes it with the scales it read from the stage
// before the wgmmas. So one batch is always queued behind the one being promoted. Two
// stages at a time, so that each partial accumulator is a fixed set of registers.
template <class Cfg, int kOffset>
__device__ __forceinline__ void pipelined_mainloop(typename Cfg::Storage& smem,
                                                   PipelineState<Cfg::kStageCount>& ps,
                                                   int ks_begin, int ks_end, uint32_t a_desc0,
                                                   uint32_t b_desc0, int row_in_wave,
                                                   float (&acc)[Cfg::kAcc]) {
  constexpr int kAcc = Cfg::kAcc, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  // Stage ks's scale products for this thread's rows (lo: row, hi: row + 8) and the three
  // column blocks of b a tile can span, and the stage's slot, until its promotion.
  struct Pending {
    float lo[3], hi[3];
    int slot;
  };
  auto issue = [&](int ks, float (&part)[kAcc], Pending& pend) {
    const int s = ps.stage;
    mbar_wait(&smem.full[s], ps.phase);
    const int kq = ks % 4;  // kb = ks: blocks are a stage wide
    const float sa0 = smem.sa[s][row_in_wave][kq], sa1 = smem.sa[s][row_in_wave + 8][kq];
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const float sb = smem.sb[s][j][kq];
      pend.lo[j] = sa0 * sb;
      pend.hi[j] = sa1 * sb;
    }
    pend.slot = s;
    const uint32_t a_lo = a_desc0 + s * kBlockM * (kBlockK / 16);
    const uint32_t b_lo = b_desc0 + s * kBlockN * (kBlockK / 16);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) fence_operand(part[i]);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kBlockK / 32; ++step) {
      const uint64_t da = kSmemDescHi | (a_lo + step * 2);
      const uint64_t db = kSmemDescHi | (b_lo + step * 2);
      Wgmma<kBlockN, Cfg::kFormatA, Cfg::kFormatB>::mma(da, db, part, step > 0);
    }
    wgmma_commit();
    ps.advance();
  };
  // After the wait for its wgmmas: the stage is read (its scales are in registers).
  auto promote = [&](float (&part)[kAcc], const Pending& pend) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) fence_operand(part[i]);
    mbar_arrive(&smem.empty[pend.slot]);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      // Accumulator i: row +8 when i % 4 >= 2, tile column 8 * (i / 4) + ..., whose b
      // scale is its column block's (8-column groups never straddle a block).
      const int blk = (kOffset + 8 * (i / 4)) / kBlockK;
      const float scale = (i % 4) >= 2 ? pend.hi[blk] : pend.lo[blk];
      acc[i] = fmaf(part[i], scale, acc[i]);
    }
  };
  float part0[kAcc], part1[kAcc];
  Pending pend0, pend1;
  int ks = ks_begin;
  if (ks >= ks_end) return;
  issue(ks++, part0, pend0);
  // Written out twice rather than as one lambda over (cur, next): with the lambda ptxas moved
  // the 64x64 tile's descriptors out of uniform registers (R2UR in the loop).
  while (true) {
    if (ks >= ks_end) {
      wgmma_wait<0>();
      promote(part0, pend0);
      return;
    }
    issue(ks++, part1, pend1);
    wgmma_wait<1>();
    promote(part0, pend0);
    if (ks >= ks_end) {
      wgmma_wait<0>();
      promote(part1, pend1);
      return;
    }
    issue(ks++, part0, pend0);
    wgmma_wait<1>();
    promote(part1, pend1);
  }
}

template <class Cfg, int BLOCK_M, int BLOCK_N, int kStages, int kScaleBlock, Fp8Format FA,
          Fp8Format FB>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    sm90_fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                         const __grid_constant__ CUtensorMap map_b,
                         const __grid_constant__ CUtensorMap map_sa,
                         const __grid_constant__ CUtensorMap map_sb, GemmParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Storage = typename Cfg::Storage;
  constexpr int kSubs = Cfg::kSubs;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);

  const int wg = threadIdx.x / kWgThreads;
  const int tid = threadIdx.x % kWgThreads;
  const int warp = tid / 32, lane = tid % 32;
  const int64_t sa_blocks = ceil_div(p.k, kScaleBlock);
  // The producer's second warp copies what TMA does not bring (per-tensor scales, or rows
  // not 16-byte aligned) and arrives on every stage's full barrier.
  const bool scale_warp = !(p.sa_tma && p.sb_tma);
  const Scheduler<BLOCK_M, BLOCK_N, Cfg::kRowB> sched(p);  // every warp, whole (grouped: a walk)

  if (threadIdx.x == 0) {
    tma_prefetch_desc(&map_a);
    tma_prefetch_desc(&map_b);
    if (p.sa_tma) tma_prefetch_desc(&map_sa);
    if (p.sb_tma) tma_prefetch_desc(&map_sb);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&smem.full[s], 1 + (scale_warp ? 32 : 0));  // the TMA thread [+ scale lanes]
      mbar_init(&smem.empty[s], Cfg::kMathWGs * kWgThreads);  // every math thread
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == Cfg::kMathWGs) {
    // ---- Producer warpgroup: warp 0's first thread streams the A and B tiles and the
    // scales that come by TMA (the whole warp takes part in each tile's group walk); warp 1
    // copies the other scales next to them (cp.async), when there are any. ----
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (warp > 1 || (warp == 1 && !scale_warp)) return;
    const uint32_t stage_bytes = Cfg::kStageBytes + (p.sa_tma ? BLOCK_M * 16 : 0) +
                                 (p.sb_tma ? (Cfg::kRowB ? BLOCK_N : 3) * 16 : 0);
    // Block scales' TMA map: each expert's ceil(N / block) rows after the earlier experts'.
    const int sb_rows_per_expert = static_cast<int>(ceil_div(p.n, kScaleBlock));
    PipelineState<kStages> ps;
    for (int t = blockIdx.x; t < sched.num_tiles(); t += gridDim.x) {
      const TileCoord tc = sched.tile(p, t);
      const int64_t nb_first = tc.n0 / kScaleBlock;
      const int64_t nb_last = (min(tc.n0 + BLOCK_N, p.n) - 1) / kScaleBlock;
      const int ks_end = static_cast<int>(tc.ks_end);  // 32 bits: 40 registers here
      for (int ks = static_cast<int>(tc.ks_begin); ks < ks_end; ++ks, ps.advance()) {
        const int s = ps.stage;
        // The first K block of the stage's scales; a 64-wide pair never straddles a box.
        const int kb0 = ks * kBlockK / kScaleBlock;
        if (warp == 0) {
          if (lane == 0) {
            mbar_wait(&smem.empty[s], ps.phase ^ 1);
            mbar_arrive_expect_tx(&smem.full[s], stage_bytes);
            tma_load_2d(&map_a, &smem.full[s], smem.a[s], ks * kBlockK, tc.row0);
            tma_load_2d(&map_b, &smem.full[s], smem.b[s], ks * kBlockK, tc.b_row0);
            // Rows past M read as zeros, rows past a group's end are the next group's: the
            // rows they scale are computed, never stored. So are b's block rows past the
            // tile's last (the box always has three).
            if (p.sa_tma) tma_load_2d(&map_sa, &smem.full[s], smem.sa[s], kb0 & ~3, tc.row0);
            if (p.sb_tma) {
              const int64_t sb_row =
                  Cfg::kRowB ? tc.b_row0 : int64_t(tc.expert) * sb_rows_per_expert + nb_first;
              tma_load_2d(&map_sb, &smem.full[s], smem.sb[s], kb0 & ~3, sb_row);
            }
          }
          continue;
        }
        mbar_wait(&smem.empty[s], ps.phase ^ 1);
#pragma unroll
        for (int sub = 0; sub < kSubs; ++sub) {
          // A K tail can leave a 64-wide sub-block empty: it promotes nothing, and its scale
          // slot [kb % 4] is not copied (a clamped copy would land on the other sub-block's).
          const int kb = kb0 + sub;
          if (kb >= sa_blocks) continue;
          // Rows past the group's (or M's) end take its last row's scale, columns past N
          // the last column's: they are computed, never stored.
          if (!p.sa_tma) {
#pragma unroll 4  // eight (256 rows) would spill the producer's 40 registers
            for (int r = lane; r < BLOCK_M; r += 32) {
              const int64_t row = tc.row0 + min(r, tc.rows - 1);
              cp_async_4(&smem.sa[s][r][kb % 4],
                         tc.sa + (p.tensor_scales ? 0 : row * p.sa_ld + kb));
            }
          }
          if (p.sb_tma) continue;
          if constexpr (Cfg::kRowB) {
#pragma unroll
            for (int c = lane; c < BLOCK_N; c += 32) {
              const int64_t col = min(tc.n0 + c, p.n - 1);
              cp_async_4(&smem.sb[s][c][kb % 4], tc.sb + col * p.sb_ld + kb);
            }
          } else if (lane < 3) {
            const int64_t nb = min(nb_first + lane, nb_last);
            cp_async_4(&smem.sb[s][lane][kb % 4],
                       tc.sb + (p.tensor_scales ? 0 : nb * p.sb_ld + kb));
          }
        }
        cp_async_mbar_arrive(&smem.full[s]);
      }
      __syncwarp();  // warp 0's idle lanes meet lane 0 before the next tile's walk
    }
    return;
  }

  // ---- Math warpgroups: wgmma on each stage, promotion at each scale block's end. ----
  setmaxnreg_inc<Cfg::kMathRegs>();
  // Row of accumulator 0 in wave w: w * 64 * kMathWGs + row_in_wave (and + 8).
  const int row_in_wave = wg * 64 + warp * 16 + lane / 4;
  // The wgmma descriptors' low words (start addresses, 16-byte units) of stage 0's tiles,
  // from the warpgroup index made warp-uniform: the descriptors then stay in uniform
  // registers, and each stage, wave and K step adds a constant.
  const int math_wg = __shfl_sync(~0u, wg, 0);
  const uint32_t a_desc0 =
      static_cast<uint32_t>(smem_desc_kmajor_sw128(smem.a[0] + math_wg * 64 * kBlockK));
  const uint32_t b_desc0 = static_cast<uint32_t>(smem_desc_kmajor_sw128(smem.b[0]));
  constexpr int kWaveRows = 64 * Cfg::kMathWGs;
  float partial[Cfg::kAcc];
  float acc[Cfg::kWaves][Cfg::kAcc];
  PipelineState<kStages> ps;

  for (int t = blockIdx.x; t < sched.num_tiles(); t += gridDim.x) {
    int scale_offset;
    int ks_begin, ks_end;  // 32 bits (TMA coordinates are: K < 2^31) for the registers
    {
      const TileCoord tc = sched.tile(p, t);
      scale_offset = static_cast<int>(tc.n0 % kScaleBlock);
      ks_begin = static_cast<int>(tc.ks_begin);
      ks_end = static_cast<int>(tc.ks_end);
      // The previous tile's epilogue has read the slot (program order, and the __syncwarp
      // at the end of every tile); the warp's lanes read it after the __syncwarp here (a
      // k-grouped range's first stage) or before the epilogue.
      if (lane == 0) smem.origin[wg * 4 + warp] = {tc.out_row0, tc.n0, tc.k0, tc.k1, tc.rows};
      __syncwarp();
    }
#pragma unroll
    for (int w = 0; w < Cfg::kWaves; ++w)
#pragma unroll
      for (int i = 0; i < Cfg::kAcc; ++i) acc[w][i] = 0.0f;

    dispatch_offset<0, Cfg::kOffsetStep, kScaleBlock>(scale_offset, [&](auto offset) {
          constexpr int kOffset = Cfg::kOneOffset ? 0 : decltype(offset)::value;
          if constexpr (Cfg::kPipelined) {
            pipelined_mainloop<Cfg, kOffset>(smem, ps, ks_begin, ks_end, a_desc0, b_desc0,
                                             row_in_wave, acc[0]);
          } else {
            for (int ks = ks_begin; ks < ks_end; ++ks, ps.advance()) {
              const int s = ps.stage;
              mbar_wait(&smem.full[s], ps.phase);
              // K-grouped: the first and last stages of a range hold other groups' tokens.
              if constexpr (Cfg::kRowB) {
                if (p.k_sizes != nullptr && (ks == ks_begin || ks == ks_end - 1)) {
                  const auto& o = smem.origin[wg * 4 + warp];
                  zero_outside<Cfg>(smem.a[s], smem.b[s], o.k0 - int64_t(ks) * kBlockK,
                                    o.k1 - int64_t(ks) * kBlockK, wg * kWgThreads + tid);
                }
              }
#pragma unroll
              for (int sub = 0; sub < kSubs; ++sub) {
                const uint32_t kb =
                    (uint32_t(ks) * kBlockK + sub * (kBlockK / kSubs)) / kScaleBlock;
                const int kq = static_cast<int>(kb % 4);  // the scales' column in the stage
                const bool first = (ks % Cfg::kStagesPerPromotion) == 0 || ks == ks_begin;
                const bool last =
                    (ks % Cfg::kStagesPerPromotion) == Cfg::kStagesPerPromotion - 1 ||
                    ks == ks_end - 1;
                const bool promote = last && int64_t(kb) < sa_blocks;
                const float sb0 = smem.sb[s][0][kq], sb1 = smem.sb[s][1][kq],
                            sb2 = smem.sb[s][2][kq];
                // Row scales of b: this thread's columns 8 j + 2 (lane % 4) + {0, 1}, read
                // before the wgmmas so that their latency hides behind them. A tile of two
                // waves has no registers left for them: it reads them in the promotion.
                constexpr bool kPreload = Cfg::kRowB && Cfg::kWaves == 1;
                float sb_cols[kPreload ? BLOCK_N / 4 : 1];
                if constexpr (kPreload) {
#pragma unroll
                  for (int c = 0; c < BLOCK_N / 4; ++c) {
                    sb_cols[c] = smem.sb[s][8 * (c / 2) + 2 * (lane % 4) + c % 2][kq];
                  }
                }
#pragma unroll
                for (int w = 0; w < Cfg::kWaves; ++w) {
                  // Every shared-memory read of the stage comes before the empty arrive below.
                  const float sa0 = smem.sa[s][w * kWaveRows + row_in_wave][kq];
                  const float sa1 = smem.sa[s][w * kWaveRows + row_in_wave + 8][kq];
                  const uint32_t a_lo = a_desc0 + (s * BLOCK_M + w * kWaveRows) * (kBlockK / 16);
                  const uint32_t b_lo = b_desc0 + s * BLOCK_N * (kBlockK / 16);
#pragma unroll
                  for (int i = 0; i < Cfg::kAcc; ++i) fence_operand(partial[i]);
                  wgmma_fence();
#pragma unroll
                  for (int step = 0; step < Cfg::kStepsPerSub; ++step) {
                    const int k_byte = (sub * Cfg::kStepsPerSub + step) * 32;
                    const uint64_t da = kSmemDescHi | (a_lo + (k_byte >> 4));
                    const uint64_t db = kSmemDescHi | (b_lo + (k_byte >> 4));
                    Wgmma<BLOCK_N, FA, FB>::mma(da, db, partial, !(first && step == 0));
                  }
                  wgmma_commit();
                  wgmma_wait<0>();
#pragma unroll
                  for (int i = 0; i < Cfg::kAcc; ++i) fence_operand(partial[i]);
                  // The stage has been read once the last wave's wgmmas are done, and its
                  // scales once the promotion that reads them from shared memory (row scales
                  // of a two-wave tile) is. Every thread arrives: an arrive releases only its
                  // own thread's reads of the scales (one arrive per warp after __syncwarp left
                  // racecheck reporting the producer's next writes).
                  const bool stage_read = sub == kSubs - 1 && w == Cfg::kWaves - 1;
                  constexpr bool kScalesInPromotion = Cfg::kRowB && !kPreload;
                  if (stage_read && !kScalesInPromotion) mbar_arrive(&smem.empty[s]);
                  if (promote && Cfg::kRowB) {
                    // Accumulator i of m64nN sits at row +8 when i % 4 >= 2 and at tile
                    // column 8 * (i / 4) + 2 * (lane % 4) + i % 2 (the layout below).
#pragma unroll
                    for (int i = 0; i < Cfg::kAcc; ++i) {
                      const int c = 2 * (i / 4) + i % 2;
                      float sb;
                      if constexpr (kPreload) {
                        sb = sb_cols[c];
                      } else {
                        sb = smem.sb[s][8 * (c / 2) + 2 * (lane % 4) + c % 2][kq];
                      }
                      const float scale = ((i % 4) >= 2 ? sa1 : sa0) * sb;
                      acc[w][i] = fmaf(partial[i], scale, acc[w][i]);
                    }
                  }
                  if (stage_read && kScalesInPromotion) mbar_arrive(&smem.empty[s]);
                  if (promote && !Cfg::kRowB) {
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
          }
        });

    // Epilogue: registers straight to global memory.
    __syncwarp();
    const auto tc = smem.origin[wg * 4 + warp];
    if (tc.n0 + BLOCK_N <= p.n && p.n % 2 == 0) {
      // The tile's columns all lie inside N: no column to check, and every store's address
      // is one of four row starts plus a constant (accumulator 4 j + 2 h + {0, 1} of wave w
      // is row w * kWaveRows + 8 h, columns 8 j + {0, 1}, from this thread's first
      // element). A tile cut by its group's (or M's) end skips its rows from tc.rows on:
      // four checks per thread, after the quad's shuffles (every lane takes part in them).
      const int64_t first = (tc.row0 + row_in_wave) * p.n + tc.n0 + 2 * (lane % 4);
#pragma unroll
      for (int w = 0; w < Cfg::kWaves; ++w) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const bool row_in = w * kWaveRows + row_in_wave + 8 * h < tc.rows;
          const int64_t start = first + (w * kWaveRows + 8 * h) * p.n;  // element index
          if (p.out_f32) {
            if (!row_in) continue;
            float2* out = reinterpret_cast<float2*>(static_cast<float*>(p.out) + start);
            const float2* c = reinterpret_cast<const float2*>(p.c + start);  // may alias out
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j) {
              float2 v = make_float2(acc[w][4 * j + 2 * h], acc[w][4 * j + 2 * h + 1]);
              if (p.c) v.x += c[4 * j].x, v.y += c[4 * j].y;
              out[4 * j] = v;
            }
          } else if (BLOCK_N % 32 == 0 && p.n % 8 == 0 &&
                     reinterpret_cast<uintptr_t>(p.out) % 16 == 0) {
            // 16 bytes per store: the quad's four lanes hold columns 8 j + 2 q + {0, 1} of
            // four consecutive j; a 4 x 4 transpose across the quad gives lane q the eight
            // columns of j = 4 jj + q (whole 32-byte sectors, a quarter of the stores).
            const int q = lane % 4;
            uint4* out = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + start -
                                                  2 * q);
#pragma unroll
            for (int jj = 0; jj < BLOCK_N / 32; ++jj) {
              uint32_t v[4];
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                const int i = 4 * (4 * jj + k) + 2 * h;
                v[k] = bf16x2_bits(acc[w][i], acc[w][i + 1]);
              }
              quad_transpose(v, q);
              if (row_in) out[4 * jj + q] = make_uint4(v[0], v[1], v[2], v[3]);
            }
          } else if (row_in) {
            __nv_bfloat162* out =
                reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + start);
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j) {
              out[4 * j] = __floats2bfloat162_rn(acc[w][4 * j + 2 * h], acc[w][4 * j + 2 * h + 1]);
            }
          }
        }
      }
    } else {
#pragma unroll
      for (int w = 0; w < Cfg::kWaves; ++w) {
#pragma unroll
        for (int i = 0; i < Cfg::kAcc; i += 2) {
          const int tile_row = w * kWaveRows + row_in_wave + ((i % 4) >= 2 ? 8 : 0);
          const int64_t row = tc.row0 + tile_row;
          const int64_t col = tc.n0 + 8 * (i / 4) + 2 * (lane % 4);
          if (tile_row >= tc.rows || col >= p.n) continue;
          const int64_t idx = row * p.n + col;
          const bool pair = col + 1 < p.n && (p.n % 2 == 0);
          const float v0 = acc[w][i], v1 = acc[w][i + 1];
          if (p.out_f32) {
            float* out = static_cast<float*>(p.out);
            // c may alias out: each element is read here, then written by this same thread.
            const float o0 = p.c ? v0 + p.c[idx] : v0;
            if (pair) {
              *reinterpret_cast<float2*>(out + idx) =
                  make_float2(o0, p.c ? v1 + p.c[idx + 1] : v1);
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
    __syncwarp();  // every lane has read the origin slot before lane 0 rewrites it
  }
#endif
}

}  // namespace fp8gemm::sm90
