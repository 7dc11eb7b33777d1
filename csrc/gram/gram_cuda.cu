// CUDA kernel of ntk_fast::gram (and gram.out): a fused dual GEMM with a Hadamard epilogue.
//
//   out[i, j] = sum_l s_l * (D1_l[i] . D2_l[j]) * (A1_l[i] . A2_l[j])
//
// One thread block owns one BM x BM output tile.  Its accumulator lives in shared memory (a BM x LDC
// tile); per layer the block computes the two tile products GA = A1_I A2_J^T and GD = D1_I D2_J^T in
// registers (a K loop over fan_in, then over fan_out, through a cp.async pipeline of STAGES shared-memory
// stages) and adds s_l * GA o GD to the accumulator.  No per-layer n x n matrix is ever written.  The
// K loops of all layers are flattened into one sequence of BK-wide chunks, so the pipeline also runs
// across layer boundaries.
//
// Three variants share the loader, the tile map and the epilogue:
//   float32, precision "highest": CUDA-core FMA, 128 x 128 tile, 256 threads, 8 x 8 outputs per thread;
//   float32, precision "tf32":    tensor cores (WMMA m16n16k8 tf32, inputs rounded to tf32 on load),
//                                 128 x 128 tile, 8 warps of 64 x 32;
//   float64 (either precision):   FP64 tensor cores (WMMA m8n8k4 double = DMMA, IEEE fp64 FMA),
//                                 64 x 64 tile, 4 warps of 32 x 32.
// Each variant has configurations with fewer stages or 64 x 64 tiles (float32: 64 threads; tf32: 4 warps of
// 32 x 32) for GPUs with less shared memory per block; the op picks the first that fits the device's
// cudaDevAttrMaxSharedMemoryPerBlockOptin (table and choice in gram_plan.h).
//
// Shared memory layout per stage: the BM rows of the left matrix then the BM rows of the right matrix,
// each row BK elements of K padded to LDK, chosen so that the fragment / float4 reads are free of bank
// conflicts (see the comments at each config).  Global loads are 16-byte cp.async's, coalesced along K;
// the host pads any feature matrix whose width is not a multiple of 16 bytes (e.g. the last layer's D
// with one column) with zero columns, which leaves every dot product unchanged.
//
// Tile order: a 1-D grid over "super tiles" of kGroup x kGroup tiles (for L2 reuse of the feature
// panels); in symmetric mode only the super tiles of the upper triangle are launched, and the blocks of
// a diagonal super tile that fall below the diagonal return at once.  Symmetric mode writes each upper
// tile and its transpose; diagonal tiles are written from their upper half, so the result is exactly
// symmetric.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "gram_common.h"
#include "gram_plan.h"

namespace ntk_fast {
namespace {

using namespace nvcuda;

constexpr int kMaxLayers = 16;  // layers per launch; more layers are done by further launches that accumulate
using gram_plan::kGroup;

template <typename T>
struct GramParams {
  const T* x1[kMaxLayers][2];  // [layer][0: A, 1: D] left features, row-major (n1, k)
  const T* x2[kMaxLayers][2];  // right features (n2, k); equal to x1 in symmetric mode
  int k[kMaxLayers][2];        // padded widths = row strides, multiples of 16 / sizeof(T)
  double scale[kMaxLayers];
  int L;
  int n1, n2;
  int tiles1, tiles2, supers2;
  int symmetric, accumulate;
  T* out;
  long long os0, os1;
};

// ---------------------------------------------------------------------------------------------------
// Configurations: the constants of gram_plan::kConfigs[I] (the table, its shared-memory sizes and the choice
// per device live in gram_plan.h, checked on the CPU by tests/test_gram_plan.py).
//
// SIMT float32 (kF32): thread (ty, tx) = (tid / TD, tid % TD), TD = BM / 8, owns the 8 x 8 outputs
//   rows ty + TD i, cols tx + TD j.  It reads rows tx + TD j of the right panel as float4 at a fixed k:
//   within an 8-thread phase the row offsets tx * LDK = tx * 20 words fall in distinct 4-bank groups.  The
//   accumulator stride LDC = BM + TD (144 = 16 mod 32 for BM 128, 72 = 8 mod 32 for BM 64) puts the
//   32 / TD values of ty in a warp on disjoint banks.
// WMMA tf32 (kTf32): fragment loads read (row g, col t) with g = lane / 4, t = lane % 4: LDK = 36,
//   36 g mod 32 = 4 g, conflict-free (LDK = 20 of the BK = 16 tile: 20 g mod 32 also distinct multiples of
//   4); LDC a multiple of 4 floats (16 bytes), as WMMA requires.
// WMMA double (kF64, DMMA): 8-byte accesses are served per half warp (rows 0..3, cols 0..3): LDK = 20
//   doubles = 4 mod 16 8-byte slots, conflict-free; LDC a multiple of 2 doubles (16 bytes).
template <int I>
struct Cfg {
  static constexpr gram_plan::TileCfg P = gram_plan::kConfigs[I];
  using T = typename std::conditional<P.variant == gram_plan::kF64, double, float>::type;
  static constexpr int BM = P.bm, BK = P.bk, NT = P.nt, STAGES = P.stages, MINB = P.minb;
  static constexpr int LDK = P.ldk, LDC = P.ldc;

  static_assert(sizeof(T) == P.itemsize, "table itemsize must match the element type");
  static_assert(STAGES >= 2, "the pipeline needs at least two stages");
  static_assert(gram_plan::smem_bytes(P) <= size_t(gram_plan::kMaxOptinBytes), "shared memory above any GPU's limit");
  static_assert((LDK * sizeof(T)) % 16 == 0 && (BK * sizeof(T)) % 16 == 0, "16-byte cp.async rows");
  static_assert((LDC * sizeof(T)) % 16 == 0, "accumulator rows must be 16-byte aligned (WMMA ldm)");
  static_assert((size_t(STAGES) * 2 * BM * LDK * sizeof(T)) % 128 == 0, "accumulator offset 128-byte aligned");
  static_assert((2 * BM * LDK * sizeof(T)) % 32 == 0, "stage offsets 32-byte aligned (WMMA pointers)");
  static_assert(P.variant != gram_plan::kF32 || (BM % 8 == 0 && (BM / 8) * (BM / 8) == NT),
                "SIMT: one thread per 8 x 8 outputs");
};

template <class C>
constexpr size_t smem_bytes() {
  static_assert(gram_plan::smem_bytes(C::P) ==
                    (size_t(C::STAGES) * 2 * C::BM * C::LDK + size_t(C::BM) * C::LDC) * sizeof(typename C::T),
                "");
  return gram_plan::smem_bytes(C::P);
}

// ---------------------------------------------------------------------------------------------------
// cp.async helpers (sm_80+).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = pred ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Loads the chunk [k0, k0 + BK) of rows row1.. of x1 and rows row2.. of x2 into one stage.
template <class C>
__device__ __forceinline__ void load_chunk(typename C::T* stage, const typename C::T* __restrict__ x1,
                                           const typename C::T* __restrict__ x2, int ld, int k0, int row1,
                                           int n1, int row2, int n2) {
  using T = typename C::T;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CPR = C::BK / VEC;  // 16-byte chunks per row
  constexpr int HALF = C::BM * CPR;
  static_assert((2 * HALF) % C::NT == 0, "loader: chunks must divide among threads");
#pragma unroll
  for (int i = 0; i < 2 * HALF / C::NT; ++i) {
    const int idx = threadIdx.x + i * C::NT;
    const int which = idx / HALF;
    const int rem = idx - which * HALF;
    const int r = rem / CPR, q = rem - (rem / CPR) * CPR;
    const int col = k0 + q * VEC;
    const T* base = which ? x2 : x1;
    const int grow = (which ? row2 : row1) + r;
    const bool ok = grow < (which ? n2 : n1) && col < ld;
    const T* src = ok ? base + (long long)grow * ld + col : base;
    cp_async16(stage + (which * C::BM + r) * C::LDK + q * VEC, src, ok);
  }
}

// ---------------------------------------------------------------------------------------------------
// Tile products.
template <class Cfg>
struct SimtCompute {
  using C = Cfg;
  static constexpr int TD = C::BM / 8;  // threads per tile edge
  using Frag = float[8][8];             // thread rows ty + TD i, cols tx + TD j

  static __device__ __forceinline__ void zero(Frag& g) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) g[i][j] = 0.f;
  }

  static __device__ __forceinline__ void mma(Frag& g, const float* stage) {
    const int ty = threadIdx.x / TD, tx = threadIdx.x % TD;
    const float* X1 = stage + ty * C::LDK;
    const float* X2 = stage + (C::BM + tx) * C::LDK;
#pragma unroll
    for (int kk = 0; kk < C::BK; kk += 4) {
      float4 b[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = *reinterpret_cast<const float4*>(X2 + TD * j * C::LDK + kk);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float4 a = *reinterpret_cast<const float4*>(X1 + TD * i * C::LDK + kk);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float v = g[i][j];
          v = fmaf(a.x, b[j].x, v);
          v = fmaf(a.y, b[j].y, v);
          v = fmaf(a.z, b[j].z, v);
          v = fmaf(a.w, b[j].w, v);
          g[i][j] = v;
        }
      }
    }
  }

  static __device__ __forceinline__ void hadamard(float* acc, float s, const Frag& ga, const Frag& gd) {
    const int ty = threadIdx.x / TD, tx = threadIdx.x % TD;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float& a = acc[(ty + TD * i) * C::LDC + tx + TD * j];
        a = fmaf(s * ga[i][j], gd[i][j], a);
      }
  }
};

template <class Cfg>
struct WmmaCompute {
  using C = Cfg;
  using T = typename C::T;
  // Warps tile the block as WARPS_M x WARPS_N; fragment shapes m16n16k8 (tf32) / m8n8k4 (double).
  static constexpr bool F64 = std::is_same<T, double>::value;
  static constexpr int WARPS_M = 2, WARPS_N = C::NT / 64;
  static constexpr int FM = F64 ? 8 : 16, FN = FM, FK = F64 ? 4 : 8;
  static_assert((FM * C::LDK * sizeof(T)) % 32 == 0 && (FK * sizeof(T)) % 32 == 0 &&
                    (FM * C::LDC * sizeof(T)) % 32 == 0 && (FN * sizeof(T)) % 32 == 0,
                "WMMA fragment pointers must be 32-byte aligned");
  using TI = typename std::conditional<std::is_same<T, float>::value, wmma::precision::tf32, double>::type;
  static constexpr int WM = C::BM / WARPS_M, WN = C::BM / WARPS_N;
  static constexpr int NFM = WM / FM, NFN = WN / FN;
  static_assert(WARPS_M * WARPS_N * 32 == C::NT, "warps must tile the block");
  using Acc = wmma::fragment<wmma::accumulator, FM, FN, FK, T>;
  using Frag = Acc[NFM][NFN];

  static __device__ __forceinline__ void zero(Frag& g) {
#pragma unroll
    for (int i = 0; i < NFM; ++i)
#pragma unroll
      for (int j = 0; j < NFN; ++j) wmma::fill_fragment(g[i][j], T(0));
  }

  static __device__ __forceinline__ void mma(Frag& g, const T* stage) {
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const T* X1 = stage + (wm * WM) * C::LDK;
    const T* X2 = stage + (C::BM + wn * WN) * C::LDK;
#pragma unroll
    for (int kk = 0; kk < C::BK; kk += FK) {
      // All right fragments first, then one left fragment at a time (fewer live registers).
      wmma::fragment<wmma::matrix_b, FM, FN, FK, TI, wmma::col_major> b[NFN];
#pragma unroll
      for (int j = 0; j < NFN; ++j) {
        // The right panel holds rows of X2, i.e. X2^T in column-major order.
        wmma::load_matrix_sync(b[j], X2 + j * FN * C::LDK + kk, C::LDK);
        if constexpr (std::is_same<T, float>::value) {
#pragma unroll
          for (int e = 0; e < b[j].num_elements; ++e) b[j].x[e] = wmma::__float_to_tf32(b[j].x[e]);
        }
      }
#pragma unroll
      for (int i = 0; i < NFM; ++i) {
        wmma::fragment<wmma::matrix_a, FM, FN, FK, TI, wmma::row_major> a;
        wmma::load_matrix_sync(a, X1 + i * FM * C::LDK + kk, C::LDK);
        if constexpr (std::is_same<T, float>::value) {
#pragma unroll
          for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
        }
#pragma unroll
        for (int j = 0; j < NFN; ++j) wmma::mma_sync(g[i][j], a, b[j], g[i][j]);
      }
    }
  }

  // Accumulator fragments of one type share their element layout, so the Hadamard product is elementwise
  // on x[]; each warp reads and writes only its own WM x WN region of the shared accumulator.
  static __device__ __forceinline__ void hadamard(T* acc, T s, const Frag& ga, const Frag& gd) {
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
    for (int i = 0; i < NFM; ++i)
#pragma unroll
      for (int j = 0; j < NFN; ++j) {
        T* ptr = acc + (wm * WM + i * FM) * C::LDC + wn * WN + j * FN;
        Acc t;
        wmma::load_matrix_sync(t, ptr, C::LDC, wmma::mem_row_major);
#pragma unroll
        for (int e = 0; e < t.num_elements; ++e) t.x[e] += s * ga[i][j].x[e] * gd[i][j].x[e];
        wmma::store_matrix_sync(ptr, t, C::LDC, wmma::mem_row_major);
      }
    __syncwarp();
  }
};

// ---------------------------------------------------------------------------------------------------
template <class C, class Compute>
__global__ void __launch_bounds__(C::NT, C::MINB) gram_kernel(const __grid_constant__ GramParams<typename C::T> p) {
  using T = typename C::T;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* stages = reinterpret_cast<T*>(smem_raw);
  T* acc = stages + C::STAGES * 2 * C::BM * C::LDK;
  constexpr int STAGE = 2 * C::BM * C::LDK;

  int bi, bj;
  if (!gram_plan::map_tile(blockIdx.x, p.symmetric != 0, p.tiles1, p.tiles2, p.supers2, bi, bj)) return;
  const int row1 = bi * C::BM, row2 = bj * C::BM;
  const bool diag = p.symmetric && bi == bj;
  T* __restrict__ out = p.out;

  // Accumulator: zero, or the current contents of out (later groups of layers).
  for (int idx = threadIdx.x; idx < C::BM * C::BM; idx += C::NT) {
    const int r = idx / C::BM, c = idx % C::BM;
    T v = T(0);
    if (p.accumulate && row1 + r < p.n1 && row2 + c < p.n2)
      v = out[(long long)(row1 + r) * p.os0 + (long long)(row2 + c) * p.os1];
    acc[r * C::LDC + c] = v;
  }

  const int total = gram_plan::total_chunks(p.k, p.L, C::BK);

  gram_plan::ChunkIter ld, cp;
  gram_plan::iter_init(ld, p.k, C::BK);
  gram_plan::iter_init(cp, p.k, C::BK);
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < total) {
      load_chunk<C>(stages + s * STAGE, p.x1[ld.l][ld.part], p.x2[ld.l][ld.part], p.k[ld.l][ld.part],
                    ld.kc * C::BK, row1, p.n1, row2, p.n2);
      gram_plan::iter_next(ld, p.k, p.L, C::BK);
    }
    cp_async_commit();
  }

  typename Compute::Frag ga, gd;
  for (int c = 0; c < total; ++c) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // chunk c landed for all threads; everyone is done with chunk c - 1's stage
    const int nc = c + C::STAGES - 1;
    if (nc < total) {
      load_chunk<C>(stages + (nc % C::STAGES) * STAGE, p.x1[ld.l][ld.part], p.x2[ld.l][ld.part],
                    p.k[ld.l][ld.part], ld.kc * C::BK, row1, p.n1, row2, p.n2);
      gram_plan::iter_next(ld, p.k, p.L, C::BK);
    }
    cp_async_commit();
    const T* st = stages + (c % C::STAGES) * STAGE;
    if (cp.part == 0) {
      if (cp.kc == 0) Compute::zero(ga);
      Compute::mma(ga, st);
    } else {
      if (cp.kc == 0) Compute::zero(gd);
      Compute::mma(gd, st);
      if (cp.kc == cp.nk - 1) Compute::hadamard(acc, static_cast<T>(p.scale[cp.l]), ga, gd);
    }
    gram_plan::iter_next(cp, p.k, p.L, C::BK);
  }
  cp_async_wait<0>();
  __syncthreads();

  // Write the tile (coalesced along rows of out when out is row-major).
  for (int idx = threadIdx.x; idx < C::BM * C::BM; idx += C::NT) {
    const int r = idx / C::BM, c = idx % C::BM;
    if (row1 + r < p.n1 && row2 + c < p.n2) {
      const T v = (diag && r > c) ? acc[c * C::LDC + r] : acc[r * C::LDC + c];
      out[(long long)(row1 + r) * p.os0 + (long long)(row2 + c) * p.os1] = v;
    }
  }
  // Mirror of an off-diagonal upper tile: out[row2 + c, row1 + r] = acc[r, c].
  if (p.symmetric && bi != bj) {
    for (int idx = threadIdx.x; idx < C::BM * C::BM; idx += C::NT) {
      const int c = idx / C::BM, r = idx % C::BM;
      if (row1 + r < p.n1 && row2 + c < p.n2)
        out[(long long)(row2 + c) * p.os0 + (long long)(row1 + r) * p.os1] = acc[r * C::LDC + c];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.
// Contiguous, 16-byte aligned, width a positive multiple of 16 bytes (gram_plan::padded_width; zero columns
// appended).  Returns t itself when it already is all that, else one copy (from any strides).  Callers that
// call the op many times on row slices of the same features (panels: ntk_fast/ntk/stream.py, the panels of
// ntk_fast/ntk/empirical.py) pad once beforehand with ntk_fast.ntk.padding.pad_features, so that every slice
// passes through here without a copy.
at::Tensor prepare(const at::Tensor& t) {
  const int64_t K = t.size(1);
  const int64_t Kp = gram_plan::padded_width(K, static_cast<int>(t.element_size()));
  if (Kp == K && t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
  at::Tensor padded = at::empty({t.size(0), Kp}, t.options());
  if (Kp > K) padded.narrow(1, K, Kp - K).zero_();
  if (K > 0) padded.narrow(1, 0, K).copy_(t);
  return padded;
}

template <class C, class Compute>
void launch(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& D1,
            const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& D2, at::ArrayRef<double> scales,
            bool symmetric, int64_t n1, int64_t n2, at::Tensor& out, cudaStream_t stream) {
  using T = typename C::T;
  auto kernel = gram_kernel<C, Compute>;
  constexpr size_t smem = smem_bytes<C>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));

  const gram_plan::Grid grid = gram_plan::grid_for(n1, n2, C::BM, symmetric);
  const int64_t blocks = grid.blocks;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "gram: n1 = ", n1, ", n2 = ", n2,
              " needs too many thread blocks for one launch; compute it in panels (ntk_fast.ntk.stream.gram_streamed)");
  const int64_t t1 = grid.tiles1, t2 = grid.tiles2, s2 = grid.supers2;

  const int64_t L = static_cast<int64_t>(A1.size());
  for (int64_t g0 = 0; g0 < L; g0 += kMaxLayers) {
    GramParams<T> p{};
    p.L = static_cast<int>(std::min<int64_t>(kMaxLayers, L - g0));
    for (int l = 0; l < p.L; ++l) {
      const int64_t gl = g0 + l;
      p.x1[l][0] = A1[gl].data_ptr<T>();
      p.x1[l][1] = D1[gl].data_ptr<T>();
      p.x2[l][0] = A2[gl].data_ptr<T>();
      p.x2[l][1] = D2[gl].data_ptr<T>();
      p.k[l][0] = static_cast<int>(A1[gl].size(1));
      p.k[l][1] = static_cast<int>(D1[gl].size(1));
      p.scale[l] = scales[gl];
    }
    p.n1 = static_cast<int>(n1);
    p.n2 = static_cast<int>(n2);
    p.tiles1 = static_cast<int>(t1);
    p.tiles2 = static_cast<int>(t2);
    p.supers2 = static_cast<int>(s2);
    p.symmetric = symmetric ? 1 : 0;
    p.accumulate = g0 > 0 ? 1 : 0;
    p.out = out.data_ptr<T>();
    p.os0 = out.stride(0);
    p.os1 = out.stride(1);
    kernel<<<static_cast<unsigned>(blocks), C::NT, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The device's opt-in shared memory per block, lowered to NTK_FAST_GRAM_SMEM_LIMIT (bytes) when that is set:
// lets one large GPU run (and test) the configurations chosen for GPUs with less shared memory.
int smem_optin(c10::DeviceIndex device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (const char* env = std::getenv("NTK_FAST_GRAM_SMEM_LIMIT")) {
    const long long lim = std::atoll(env);
    if (lim > 0 && lim < v) v = static_cast<int>(lim);
  }
  return v;
}

size_t smallest_smem(int variant) {
  size_t m = 0;
  for (int i = 0; i < gram_plan::kNumConfigs; ++i)
    if (gram_plan::kConfigs[i].variant == variant) m = m == 0 ? gram_plan::smem_bytes(gram_plan::kConfigs[i])
                                                              : std::min(m, gram_plan::smem_bytes(gram_plan::kConfigs[i]));
  return m;
}

template <int I>
void launch_index(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& D1,
                  const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& D2, at::ArrayRef<double> scales,
                  bool symmetric, int64_t n1, int64_t n2, at::Tensor& out, cudaStream_t stream) {
  using C = Cfg<I>;
  using Compute = typename std::conditional<C::P.variant == gram_plan::kF32, SimtCompute<C>, WmmaCompute<C>>::type;
  launch<C, Compute>(A1, D1, A2, D2, scales, symmetric, n1, n2, out, stream);
}

// Runs configuration `cfg` (an index into gram_plan::kConfigs).
void launch_config(int cfg, const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& D1,
                   const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& D2, at::ArrayRef<double> scales,
                   bool symmetric, int64_t n1, int64_t n2, at::Tensor& out, cudaStream_t stream) {
  static_assert(gram_plan::kNumConfigs == 7, "one case per configuration");
  switch (cfg) {
    case 0: return launch_index<0>(A1, D1, A2, D2, scales, symmetric, n1, n2, out, stream);
    case 1: return launch_index<1>(A1, D1, A2, D2, scales, symmetric, n1, n2, out, stream);
    case 2: return launch_index<2>(A1, D1, A2, D2, scales, symmetric, n1, n2, out, stream);
    case 3: return launch_index<3>(A1, D1, A2, D2, scales, symmetric, n1, n2, out, stream);
    case 4: return launch_index<4>(A1, D1, A2, D2, scales, symmetric, n1, n2, out, stream);
    case 5: return launch_index<5>(A1, D1, A2, D2, scales, symmetric, n1, n2, out, stream);
    case 6: return launch_index<6>(A1, D1, A2, D2, scales, symmetric, n1, n2, out, stream);
    default: TORCH_CHECK(false, "gram: internal error: configuration ", cfg);
  }
}

void gram_out_cuda(at::TensorList a1, at::TensorList d1, const OptList& a2_, const OptList& d2_,
                   at::ArrayRef<double> scales, int64_t block, c10::string_view precision,
                   at::Tensor out) {
  const GramRight right = resolve_right(a2_, d2_);
  const at::TensorList a2 = right.a2, d2 = right.d2;
  const bool symmetric = right.symmetric;
  check_precision(precision);
  const GramShape s = check_gram_args(a1, d1, a2, d2, scales, symmetric);
  check_gram_out(out, s, a1[0]);
  const at::Device dev = a1[0].device();
  TORCH_CHECK(out.device() == dev, "gram: out is on ", out.device(), " but the features are on ", dev,
              "; out must be on the features' device",
              dev.is_cuda() ? " (for a CPU out use ntk_fast.ntk.stream.gram_streamed)" : "");
  TORCH_CHECK(dev.is_cuda(), "gram: the CUDA kernel got a1[0] on ", dev,
              "; the features (a1, d1, a2, d2) and out must all be on one CUDA device");
  TORCH_CHECK(block >= 0, "gram: block must be >= 0 (0 = automatic), got ", block);
  // block is a CPU tiling hint; the CUDA tile edge is fixed per precision (128, or 64 for float64).
  at::assert_no_internal_overlap(out);
  if (s.n1 == 0 || s.n2 == 0) return;
  TORCH_CHECK(s.n1 < std::numeric_limits<int32_t>::max() && s.n2 < std::numeric_limits<int32_t>::max(),
              "gram: n1 and n2 must be below 2^31 on CUDA");
  for (size_t l = 0; l < a1.size(); ++l) {
    TORCH_CHECK(a1[l].size(1) < (1LL << 30) && d1[l].size(1) < (1LL << 30), "gram: feature widths must be < 2^30");
  }

  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(dev.index()).stream();

  std::vector<at::Tensor> A1, D1, A2, D2;
  for (size_t l = 0; l < a1.size(); ++l) {
    A1.push_back(prepare(a1[l]));
    D1.push_back(prepare(d1[l]));
  }
  if (symmetric) {
    A2 = A1;
    D2 = D1;
  } else {
    for (size_t l = 0; l < a2.size(); ++l) {
      A2.push_back(prepare(a2[l]));
      D2.push_back(prepare(d2[l]));
    }
  }
  const int variant = a1[0].scalar_type() == at::kDouble ? gram_plan::kF64
                      : precision == "tf32"                 ? gram_plan::kTf32
                                                            : gram_plan::kF32;
  const int optin = smem_optin(dev.index());
  const int cfg = gram_plan::choose_config(variant, optin);
  TORCH_CHECK(cfg >= 0, "gram: no tile configuration of the CUDA kernel fits in the ", optin,
              " bytes of shared memory per block of ", dev, " (", at::cuda::getDeviceProperties(dev.index())->name,
              "); the smallest needs ", smallest_smem(variant), " bytes");
  launch_config(cfg, A1, D1, A2, D2, scales, symmetric, s.n1, s.n2, out, stream);
}

at::Tensor gram_cuda(at::TensorList a1, at::TensorList d1, const OptList& a2_, const OptList& d2_,
                     at::ArrayRef<double> scales, int64_t block, c10::string_view precision) {
  const GramRight right = resolve_right(a2_, d2_);
  const at::TensorList a2 = right.a2, d2 = right.d2;
  const bool symmetric = right.symmetric;
  const GramShape s = check_gram_args(a1, d1, a2, d2, scales, symmetric);
  at::Tensor out = at::empty({s.n1, s.n2}, a1[0].options());
  gram_out_cuda(a1, d1, a2_, d2_, scales, block, precision, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("gram.out", &gram_out_cuda);
}

}  // namespace ntk_fast
