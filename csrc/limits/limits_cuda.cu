// CUDA kernel of ntk_fast::limit_kernels (semantics in limits_cpu.cpp / ntk_fast/ops/reference_limits.py).
// Deliberately simple: the first-layer covariances x1 x2^T / d come from one cuBLAS product in double (an
// n1 x n2 double temporary, unlike the CPU kernel's per-tile products), then one thread per entry runs the
// layer recursion of limits_common.h (closed form, table or quadrature) in double; in symmetric mode only
// entries j >= i do work and write both (i, j) and (j, i).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "limits_common.h"
#include "limits_params.h"

namespace ntk_fast {
namespace {

using limits::Params;

template <typename scalar_t>
__global__ void limit_entries(Params P, const double* __restrict__ s0, bool symmetric, scalar_t* nngp, scalar_t* ntk) {
  const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t i = (int64_t)blockIdx.y * blockDim.y + threadIdx.y;
  if (i >= P.n1 || j >= P.n2 || (symmetric && j < i)) return;
  double s, t;
  limits::entry(P, i, j, s0[i * P.n2 + j], symmetric && i == j, s, t);
  nngp[i * P.n2 + j] = (scalar_t)s;
  ntk[i * P.n2 + j] = (scalar_t)t;
  if (symmetric && j != i) {
    nngp[j * P.n2 + i] = (scalar_t)s;
    ntk[j * P.n2 + i] = (scalar_t)t;
  }
}

std::tuple<at::Tensor, at::Tensor> limit_kernels_cuda(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& q1,
                                                      const at::Tensor& q2, const at::Tensor& table,
                                                      const at::Tensor& nodes, const at::Tensor& weights,
                                                      bool symmetric, int64_t L, c10::string_view activation,
                                                      double beta, double c, double bias, int64_t block) {
  TORCH_CHECK(x1.dim() == 2 && x1.size(0) > 0, "limit_kernels: x1 must be (n1, d)");
  TORCH_CHECK(x1.scalar_type() == at::kFloat || x1.scalar_type() == at::kDouble,
              "limit_kernels: x1 must be float32 or float64");
  const at::Tensor& y = symmetric ? x1 : x2;
  const at::Tensor& qb = symmetric ? q1 : q2;
  TORCH_CHECK(y.dim() == 2 && y.size(1) == x1.size(1), "limit_kernels: x2 must be (n2, d)");
  TORCH_CHECK(L >= 1, "limit_kernels: L must be >= 1");
  for (const at::Tensor* t : {&q1, &qb, &table, &nodes, &weights})
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->device() == x1.device(),
                "limit_kernels: q1, q2, table, nodes, weights must be float64 on x1's device");
  const int64_t n1 = x1.size(0), n2 = y.size(0);
  TORCH_CHECK(q1.dim() == 2 && q1.size(0) == L && q1.size(1) == n1 && qb.dim() == 2 && qb.size(0) == L &&
                  qb.size(1) == n2, "limit_kernels: q1, q2 must be (L, n1), (L, n2)");
  c10::cuda::CUDAGuard guard(x1.device());
  const bool has_table = table.numel() > 0;
  const std::string act(activation.data(), activation.size());
  Params P;
  if (has_table) {
    TORCH_CHECK(table.dim() == 3 && table.size(0) == L && table.size(1) == 4 && table.size(2) >= 4,
                "limit_kernels: table must be (L, 4, K + 1)");
    P.mode = limits::kTable;
  } else if (act == "relu") {
    P.mode = limits::kRelu;
  } else if (act == "softplus" || act == "tanh") {
    P.mode = act == "softplus" ? limits::kSoftplus : limits::kTanh;
    TORCH_CHECK(nodes.dim() == 1 && nodes.numel() >= 1 && weights.sizes() == nodes.sizes(),
                "limit_kernels: nodes and weights must be (m,)");
  } else {
    TORCH_CHECK(false, "limit_kernels: activation must be relu, softplus or tanh without a table");
  }
  const at::Tensor x1d = x1.to(at::kDouble), x2d = symmetric ? x1d : y.to(at::kDouble);
  const at::Tensor s0 = at::mm(x1d, x2d.t()).div_((double)x1.size(1)).contiguous();
  const at::Tensor q1c = q1.contiguous(), q2c = qb.contiguous(), tc = table.contiguous();
  const at::Tensor xc = nodes.contiguous(), wc = weights.contiguous();
  P = limits::make_params(P.mode, L, n1, n2, q1c, q2c, tc, xc, wc, beta, c, bias);
  at::Tensor nngp = at::empty({n1, n2}, x1.options());
  at::Tensor ntk = at::empty({n1, n2}, x1.options());
  const dim3 threads(32, 8);
  const dim3 blocks((unsigned)((n2 + 31) / 32), (unsigned)((n1 + 7) / 8));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "limit_kernels_cuda", [&] {
    limit_entries<scalar_t><<<blocks, threads, 0, stream>>>(P, s0.data_ptr<double>(), symmetric,
                                                           nngp.data_ptr<scalar_t>(), ntk.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {nngp, ntk};
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CUDA, m) { m.impl("limit_kernels", &limit_kernels_cuda); }

}  // namespace ntk_fast
