// CUDA kernel of ntk_fast::gram_full (maths in gram_full_common.h).
//
// The host walks over tiles of B points x B points (B k T_max about 2048 rows of the D tile), in stream order
// on the current stream.  Per tile and layer the two tile products GA = A1_I A2_J^T and GD = D1_I D2_J^T are
// cuBLAS GEMMs (at::mm_out into preallocated buffers; float32 follows torch's matmul precision setting, IEEE by
// default), then `combine` adds s_l sum_{t, t'} GA[(i, t), (j, t')] GD[(i, c, t), (j, c', t')] to the tile's
// accumulator acc[(i, c), (j, c')] (one thread per entry), and after the last layer `store` writes the tile into
// out[i, j, c, c'] and, in symmetric mode, its mirror out[j, i, c', c] (diagonal tiles from their upper half, so
// the result is exactly symmetric).  Memory: out plus three tile buffers (at most 2048^2 entries each).
// Factored layers (w given) are made dense first (D = s o w, materialise_factors): no k(k+1)/2 saving here yet.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gram_full_common.h"

namespace ntk_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRows = 2048;   // about this many rows of the D tile per tile
constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t>
__global__ void combine(scalar_t* __restrict__ acc, const scalar_t* __restrict__ ga, const scalar_t* __restrict__ gd,
                        int64_t mj, int64_t k, int64_t T, scalar_t s) {
  const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;   // column (j, c')
  const int64_t u = blockIdx.y;                                        // row (i, c)
  if (v >= mj * k) return;
  const int64_t i = u / k, j = v / k, lga = mj * T, lgd = mj * k * T;
  scalar_t sum = 0;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* gar = ga + (i * T + t) * lga + j * T;
    const scalar_t* gdr = gd + (u * T + t) * lgd + v * T;
    for (int64_t t2 = 0; t2 < T; ++t2) sum += gar[t2] * gdr[t2];
  }
  acc[u * mj * k + v] += s * sum;
}

template <typename scalar_t>
__global__ void store(scalar_t* __restrict__ out, int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                      const scalar_t* __restrict__ acc, int64_t i0, int64_t j0, int64_t mj, int64_t k, bool mirror,
                      bool diagonal) {
  const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t u = blockIdx.y;
  if (v >= mj * k || (diagonal && u > v)) return;
  const int64_t i = u / k, c = u % k, j = v / k, c2 = v % k;
  const scalar_t val = acc[u * mj * k + v];
  out[(i0 + i) * s0 + (j0 + j) * s1 + c * s2 + c2 * s3] = val;
  if (mirror || (diagonal && u < v)) out[(j0 + j) * s0 + (i0 + i) * s1 + c2 * s2 + c * s3] = val;
}

template <typename scalar_t>
void run_tiles(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& D1, const std::vector<at::Tensor>& A2,
               const std::vector<at::Tensor>& D2, at::ArrayRef<double> scales, const GramFullShape& s, int64_t B,
               at::Tensor& out, cudaStream_t stream) {
  const int64_t k = s.k;
  const auto opts = A1[0].options();
  at::Tensor ga = at::empty({B * s.tmax * B * s.tmax}, opts), gd = at::empty({B * k * s.tmax * B * k * s.tmax}, opts);
  at::Tensor acc = at::empty({B * k * B * k}, opts);
  const auto tiles = gram_full_tiles((s.n1 + B - 1) / B, (s.n2 + B - 1) / B, s.symmetric);
  const auto st = out.strides();
  for (const auto& tile : tiles) {
    const int64_t i0 = tile.first * B, j0 = tile.second * B;
    const int64_t mi = std::min(B, s.n1 - i0), mj = std::min(B, s.n2 - j0);
    const dim3 grid((unsigned)((mj * k + kThreads - 1) / kThreads), (unsigned)(mi * k));
    acc.zero_();
    for (size_t l = 0; l < A1.size(); ++l) {
      const int64_t T = A1[l].size(1), p = A1[l].size(2), q = D1[l].size(3);
      at::Tensor ga_t = ga.narrow(0, 0, mi * T * mj * T).view({mi * T, mj * T});
      at::Tensor gd_t = gd.narrow(0, 0, mi * k * T * mj * k * T).view({mi * k * T, mj * k * T});
      at::mm_out(ga_t, A1[l].view({-1, p}).narrow(0, i0 * T, mi * T), A2[l].view({-1, p}).narrow(0, j0 * T, mj * T).t());
      at::mm_out(gd_t, D1[l].view({-1, q}).narrow(0, i0 * k * T, mi * k * T),
                 D2[l].view({-1, q}).narrow(0, j0 * k * T, mj * k * T).t());
      combine<scalar_t><<<grid, kThreads, 0, stream>>>(acc.data_ptr<scalar_t>(), ga_t.data_ptr<scalar_t>(),
                                                       gd_t.data_ptr<scalar_t>(), mj, k, T, (scalar_t)scales[l]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const bool diagonal = s.symmetric && i0 == j0;
    store<scalar_t><<<grid, kThreads, 0, stream>>>(out.data_ptr<scalar_t>(), st[0], st[1], st[2], st[3],
                                                   acc.data_ptr<scalar_t>(), i0, j0, mj, k,
                                                   s.symmetric && !diagonal, diagonal);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void gram_full_out_cuda(at::TensorList a1, at::TensorList d1, const GFOptList& a2, const GFOptList& d2,
                        at::ArrayRef<double> scales, int64_t block, const GFFactors& w, at::Tensor out) {
  const GramFullShape s = check_gram_full_args(a1, d1, a2, d2, scales, w);
  check_gram_full_out(out, s, a1[0]);
  const at::Device dev = a1[0].device();
  TORCH_CHECK(dev.is_cuda(), "gram_full: the CUDA kernel got a1[0] on ", dev);
  TORCH_CHECK(block >= 0, "gram_full: block must be >= 0 (0 = automatic), got ", block);
  if (s.n1 == 0 || s.n2 == 0) return;
  const int64_t B = block > 0 ? block : gram_full_points_per_tile(s.k, s.tmax, kRows);
  TORCH_CHECK(B * s.k <= kMaxGridY, "gram_full: block x outputs (", B, " x ", s.k, ") must be <= ", kMaxGridY,
              " on CUDA");
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(dev.index()).stream();
  GramFullInputs in = gram_full_inputs(a1, d1, a2, d2, s.symmetric, w);
  materialise_factors(in, s.symmetric);
  AT_DISPATCH_FLOATING_TYPES(in.A1[0].scalar_type(), "gram_full_cuda", [&] {
    run_tiles<scalar_t>(in.A1, in.D1, in.A2, in.D2, scales, s, B, out, stream);
  });
}

at::Tensor gram_full_cuda(at::TensorList a1, at::TensorList d1, const GFOptList& a2, const GFOptList& d2,
                          at::ArrayRef<double> scales, int64_t block, const GFFactors& w) {
  return gram_full_allocating(a1, d1, a2, d2, scales, block, w, gram_full_out_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CUDA, m) {
  m.impl("gram_full", &gram_full_cuda);
  m.impl("gram_full.out", &gram_full_out_cuda);
}

}  // namespace ntk_fast
