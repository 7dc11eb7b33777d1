// Host-and-device logic of the CUDA Gram kernel that does not touch data: the tile configurations and their
// shared-memory size, the choice of configuration for a device's shared-memory limit, the map from a block
// index to its output tile, the grid size, and the walk over the flattened K chunks of all layers.
//
// Plain C++ (no torch, no CUDA headers): gram_cuda.cu includes it under nvcc, and tests/test_gram_plan.py
// compiles tests/cpp/gram_plan_test.cpp against it with the host compiler, so this logic is checked on
// machines without a GPU.
//
// Shared memory of a configuration (elements of itemsize bytes):
//   smem = STAGES * 2 * BM * LDK   (the pipeline: per stage BM rows of the left and BM rows of the right
//                                   features, BK values of K each, row stride LDK)
//        + BM * LDC                (the tile accumulator, row stride LDC)
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define NTK_HD __host__ __device__
#else
#define NTK_HD
#endif

namespace ntk_fast {
namespace gram_plan {

enum Variant : int { kF32 = 0, kTf32 = 1, kF64 = 2 };  // float32 "highest", float32 "tf32", float64

struct TileCfg {
  int variant;
  int bm, bk;       // tile edge (rows and columns of out per block), K chunk per pipeline stage
  int nt, minb;     // threads per block, __launch_bounds__ min blocks per SM
  int stages;       // cp.async pipeline depth (>= 2)
  int ldk, ldc;     // shared row strides (elements) of a stage row and of the accumulator
  int itemsize;     // bytes per element
};

constexpr size_t smem_bytes(const TileCfg& c) {
  return (size_t(c.stages) * 2 * c.bm * c.ldk + size_t(c.bm) * c.ldc) * size_t(c.itemsize);
}

// Candidates per variant, preferred (fastest) first.  Strides: see the comments at the configs in
// gram_cuda.cu (bank-conflict-free fragment / float4 reads; WMMA needs 16-byte row strides).
//   index  variant  BM  BK  NT  stages  smem      fits (opt-in limit per block)
//   0      f32     128  16 256  3       132 KiB   H100/H200 (227 KiB), A100 (163 KiB)
//   1      f32      64  16  64  3        48 KiB   every sm_80+ GPU (RTX 30xx/40xx, L4, L40: 99 KiB)
//   2      tf32    128  32 256  3       174 KiB   H100/H200
//   3      tf32    128  16 256  3       126 KiB   A100 (half the K chunk of index 2: twice the stage waits)
//   4      tf32     64  32 128  3        71 KiB   every sm_80+ GPU
//   5      f64      64  16 128  3        93 KiB   every sm_80+ GPU
//   6      f64      64  16 128  2        73 KiB   (smaller limits)
// (A 128 x 128 tf32 tile with BK = 32 and 2 stages, 138 KiB, would also fit the A100 but spills 4 bytes of
// registers with ptxas 13.0 for sm_90, which CI refuses.)  tf32 with LDK = 20: fragment rows g = lane / 4 start
// at 20 g mod 32 = 0, 20, 8, 28, 16, 4, 24, 12 words, distinct multiples of 4, so the loads stay conflict-free.
constexpr int kNumConfigs = 7;
constexpr TileCfg kConfigs[kNumConfigs] = {
    {kF32, 128, 16, 256, 1, 3, 16 + 4, 128 + 16, 4},
    {kF32, 64, 16, 64, 4, 3, 16 + 4, 64 + 8, 4},
    {kTf32, 128, 32, 256, 1, 3, 32 + 4, 128 + 4, 4},
    {kTf32, 128, 16, 256, 1, 3, 16 + 4, 128 + 4, 4},
    {kTf32, 64, 32, 128, 2, 3, 32 + 4, 64 + 4, 4},
    {kF64, 64, 16, 128, 2, 3, 16 + 4, 64 + 2, 8},
    {kF64, 64, 16, 128, 2, 2, 16 + 4, 64 + 2, 8},
};

// Largest opt-in shared memory per block of the GPUs we build for (sm_90: 227 KiB).
constexpr long long kMaxOptinBytes = 227 * 1024;

// Index into kConfigs of the first (preferred) configuration of `variant` whose shared memory fits in
// `smem_optin` bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin), or -1 when none fits.
constexpr int choose_config(int variant, long long smem_optin) {
  for (int i = 0; i < kNumConfigs; ++i)
    if (kConfigs[i].variant == variant && static_cast<long long>(smem_bytes(kConfigs[i])) <= smem_optin) return i;
  return -1;
}

// Opt-in shared memory per block of the GPU classes we build for: sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4, L40),
// sm_80 (A100), sm_90 (H100 / H200).  Every precision has a configuration on each, and the A100 gets a
// 128 x 128 tile in every precision that has one (float32 and tf32).
constexpr long long kOptinConsumer = 99 * 1024, kOptinA100 = 163 * 1024, kOptinH100 = 227 * 1024;
static_assert(choose_config(kF32, kOptinConsumer) >= 0 && choose_config(kTf32, kOptinConsumer) >= 0 &&
                  choose_config(kF64, kOptinConsumer) >= 0,
              "every precision needs a configuration within 99 KiB (RTX 30xx/40xx, L4, L40)");
static_assert(choose_config(kF32, kOptinA100) >= 0 && choose_config(kTf32, kOptinA100) >= 0 &&
                  choose_config(kF64, kOptinA100) >= 0,
              "every precision needs a configuration within 163 KiB (A100)");
static_assert(choose_config(kF32, kOptinH100) >= 0 && choose_config(kTf32, kOptinH100) >= 0 &&
                  choose_config(kF64, kOptinH100) >= 0,
              "every precision needs a configuration within 227 KiB (H100/H200)");
static_assert(kConfigs[choose_config(kF32, kOptinA100)].bm == 128 && kConfigs[choose_config(kTf32, kOptinA100)].bm == 128,
              "the A100 runs float32 and tf32 with 128 x 128 tiles");
static_assert(kOptinH100 == kMaxOptinBytes, "the largest limit is sm_90's");

// Tile order: a 1-D grid over super tiles of kGroup x kGroup tiles (L2 reuse of the feature panels).
constexpr int kGroup = 8;

struct Grid {
  long long tiles1, tiles2, supers1, supers2, blocks;
};

// Blocks launched for an n1 x n2 output with tile edge bm.  Symmetric (n1 == n2): only the super tiles of
// the upper triangle, s2 (s2 + 1) / 2 of them.
inline Grid grid_for(long long n1, long long n2, int bm, bool symmetric) {
  Grid g;
  g.tiles1 = (n1 + bm - 1) / bm;
  g.tiles2 = (n2 + bm - 1) / bm;
  g.supers1 = (g.tiles1 + kGroup - 1) / kGroup;
  g.supers2 = (g.tiles2 + kGroup - 1) / kGroup;
  const long long supers = symmetric ? g.supers2 * (g.supers2 + 1) / 2 : g.supers1 * g.supers2;
  g.blocks = supers * kGroup * kGroup;
  return g;
}

// Block b -> output tile (bi, bj); false for blocks with nothing to do (past the edge, or below the
// diagonal in symmetric mode).  Symmetric: s enumerates the super tiles (C <= R) of the lower triangle row
// by row (s = R (R + 1) / 2 + C) and the block serves the upper super tile (C, R); within a diagonal super
// tile the blocks with bi > bj return.  Every tile (bi <= bj) is then served by exactly one block.
NTK_HD inline bool map_tile(long long b, bool symmetric, int tiles1, int tiles2, int supers2, int& bi, int& bj) {
  const long long s = b / (kGroup * kGroup);
  const int local = static_cast<int>(b - s * (kGroup * kGroup));
  if (symmetric) {
    long long r = static_cast<long long>((sqrt(8.0 * static_cast<double>(s) + 1.0) - 1.0) * 0.5);
    while (r > 0 && r * (r + 1) / 2 > s) --r;  // correct the floating-point estimate either way
    while ((r + 1) * (r + 2) / 2 <= s) ++r;
    const long long c = s - r * (r + 1) / 2;
    bi = static_cast<int>(c * kGroup + local / kGroup);
    bj = static_cast<int>(r * kGroup + local % kGroup);
    return bj < tiles2 && bi <= bj;
  }
  const long long r = s / supers2, c = s - (s / supers2) * supers2;
  bi = static_cast<int>(r * kGroup + local / kGroup);
  bj = static_cast<int>(c * kGroup + local % kGroup);
  return bi < tiles1 && bj < tiles2;
}

// The flattened chunk sequence of one launch: for l = 0..L-1, part 0 (A: K = k[l][0]) then part 1
// (D: K = k[l][1]), chunks kc = 0..nk-1 of bk values each.
struct ChunkIter {
  int l, part, kc, nk;
};

NTK_HD inline int chunks_of(int k, int bk) { return (k + bk - 1) / bk; }

NTK_HD inline void iter_init(ChunkIter& it, const int (*k)[2], int bk) {
  it.l = 0;
  it.part = 0;
  it.kc = 0;
  it.nk = chunks_of(k[0][0], bk);
}

NTK_HD inline void iter_next(ChunkIter& it, const int (*k)[2], int L, int bk) {
  if (++it.kc == it.nk) {
    it.kc = 0;
    if (it.part == 0) {
      it.part = 1;
    } else {
      it.part = 0;
      ++it.l;
    }
    if (it.l < L) it.nk = chunks_of(k[it.l][it.part], bk);
  }
}

NTK_HD inline int total_chunks(const int (*k)[2], int L, int bk) {
  int total = 0;
  for (int l = 0; l < L; ++l) total += chunks_of(k[l][0], bk) + chunks_of(k[l][1], bk);
  return total;
}

// Host-side padding: width (elements) of a feature matrix as the kernel reads it, a positive multiple of
// 16 bytes (zero columns appended).
inline long long padded_width(long long k, int itemsize) {
  const long long vec = 16 / itemsize;
  const long long kp = (k + vec - 1) / vec * vec;
  return kp < vec ? vec : kp;
}

}  // namespace gram_plan
}  // namespace ntk_fast
