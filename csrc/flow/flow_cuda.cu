// CUDA kernels of the gradient-flow ops (same maths as flow_cpu.cpp; schemas in csrc/register.cpp).
//
// Everything runs on the current stream with no host synchronisation and no host-side reads of device
// data: dt is read on the device, outputs are allocated through the caching allocator, so the ops can be
// captured in a CUDA graph.  Reductions use a fixed partition (blocks of kStatsBlock / kLossBlock entries,
// combined in order by a second single-block pass), so results are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "flow_common.h"

namespace ntk_fast {
namespace {
using namespace ntk_fast::flow;

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void step_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
                            const scalar_t* __restrict__ v, const scalar_t* __restrict__ dt, double tau,
                            scalar_t* __restrict__ wo, scalar_t* __restrict__ vo, int64_t P) {
  const int64_t k = blockIdx.y;
  const scalar_t h = dt[k];
  const int64_t off = k * P;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if (tau > 0.0) {
    const scalar_t x = (scalar_t)exp(-(double)h / tau), omx = (scalar_t)1 - x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < P; i += stride) {
      const scalar_t vn = x * v[off + i] - omx * g[off + i];
      vo[off + i] = vn;
      wo[off + i] = w[off + i] + h * vn;
    }
  } else {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < P; i += stride)
      wo[off + i] = w[off + i] - h * g[off + i];
  }
}

// The CUDA kernels read raw device pointers: every tensor they touch must be on a CUDA device (a raw op
// call with CPU tensors reaches this file as soon as one argument, e.g. an empty v, is on CUDA).  The shared
// checks (flow_common.h) then tie every tensor to the first one's device.
void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA kernel): ", name, " must be on a CUDA device, got ", t.device(),
              "; all tensors of one call must be on the same device");
}

void flow_step_cuda(const at::Tensor& w, const at::Tensor& g, const at::Tensor& v, const at::Tensor& dt, double tau,
                    at::Tensor w_out, at::Tensor v_out) {
  check_cuda(w, "flow_step", "w");
  const bool momentum = check_step_args(w, g, v, dt, tau, w_out, v_out);
  const int64_t K = w.size(0), P = w.size(1);
  if (K == 0 || P == 0) return;
  const c10::cuda::CUDAGuard guard(w.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t want = (P + kThreads - 1) / kThreads;
  const dim3 grid((unsigned)std::min<int64_t>(want, 4096), (unsigned)K);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "flow_step_cuda", [&] {
    step_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        w.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), momentum ? v.data_ptr<scalar_t>() : nullptr,
        dt.data_ptr<scalar_t>(), tau, w_out.data_ptr<scalar_t>(), momentum ? v_out.data_ptr<scalar_t>() : nullptr,
        P);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// In-block tree reduction of a double (fixed order: deterministic).
__device__ double block_sum(double x, double* sh) {
  sh[threadIdx.x] = x;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const double r = sh[0];
  __syncthreads();
  return r;
}

__device__ double block_max(double x, double* sh) {
  sh[threadIdx.x] = x;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const double r = sh[0];
  __syncthreads();
  return r;
}

// Stage 1: block (b, k) reduces entries [b*B, (b+1)*B) of row k into part[(k*nb + b)*2 + {0,1}].
template <typename scalar_t>
__global__ void stats_partial(const scalar_t* __restrict__ g, const scalar_t* __restrict__ gp, double* part,
                              int64_t P, int64_t nb) {
  __shared__ double sh[kThreads];
  const int64_t k = blockIdx.y, b = blockIdx.x;
  const int64_t i0 = b * kStatsBlock, i1 = min(P, i0 + kStatsBlock);
  double s1 = 0.0, s2 = 0.0;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const double x = (double)gp[k * P + i], d = (double)g[k * P + i] - x;
    s1 += x * x;
    s2 += d * d;
  }
  s1 = block_sum(s1, sh);
  s2 = block_sum(s2, sh);
  if (threadIdx.x == 0) {
    part[(k * nb + b) * 2] = s1;
    part[(k * nb + b) * 2 + 1] = s2;
  }
}

// Stage 2: one block per net sums its nb partials.
__global__ void stats_final(const double* part, double* out, int64_t nb) {
  __shared__ double sh[kThreads];
  const int64_t k = blockIdx.x;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) {
    s1 += part[(k * nb + b) * 2];
    s2 += part[(k * nb + b) * 2 + 1];
  }
  s1 = block_sum(s1, sh);
  s2 = block_sum(s2, sh);
  if (threadIdx.x == 0) {
    out[2 * k] = s1;
    out[2 * k + 1] = s2;
  }
}

at::Tensor flow_grad_stats_cuda(const at::Tensor& g, const at::Tensor& gp) {
  check_cuda(g, "flow_grad_stats", "g");
  check_stats_args(g, gp);
  const int64_t K = g.size(0), P = g.size(1);
  at::Tensor out = at::zeros({K, 2}, g.options().dtype(at::kDouble));
  if (K == 0 || P == 0) return out;
  const c10::cuda::CUDAGuard guard(g.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t nb = (P + kStatsBlock - 1) / kStatsBlock;
  at::Tensor part = at::empty({K, nb, 2}, out.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "flow_grad_stats_cuda", [&] {
    stats_partial<scalar_t><<<dim3((unsigned)nb, (unsigned)K), kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(), part.data_ptr<double>(), P, nb);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stats_final<<<(unsigned)K, kThreads, 0, stream>>>(part.data_ptr<double>(), out.data_ptr<double>(), nb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Stage 1: block (b, k) handles points [b*B, (b+1)*B) of net k; writes F, r and a partial
// (loss sum, count under the margin, max |dF|, non-finite flag).
template <typename scalar_t>
__global__ void loss_partial(const scalar_t* __restrict__ f, const scalar_t* __restrict__ f0,
                             const scalar_t* __restrict__ y, const scalar_t* __restrict__ Fp, double alpha,
                             double beta, Loss kind, scalar_t* __restrict__ F, scalar_t* __restrict__ r,
                             double* part, int64_t n, int64_t nb) {
  __shared__ double sh[kThreads];
  const int64_t k = blockIdx.y, b = blockIdx.x;
  const int64_t j0 = b * kLossBlock, j1 = min(n, j0 + kLossBlock);
  const scalar_t a = (scalar_t)alpha, rs = (scalar_t)(1.0 / (alpha * (double)n));
  double lsum = 0.0, cnt = 0.0, dmax = 0.0, bad = 0.0;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const int64_t i = k * n + j;
    const scalar_t Fi = a * (f[i] - f0[i]);
    const scalar_t u = y[j] * Fi;
    scalar_t l, dl;
    loss_and_grad<scalar_t>(kind, (scalar_t)beta, Fi, y[j], l, dl);
    F[i] = Fi;
    r[i] = dl * rs;
    lsum += (double)l;
    cnt += u < (scalar_t)1 ? 1.0 : 0.0;
    dmax = fmax(dmax, fabs((double)Fi - (double)Fp[i]));
    if (!isfinite((double)Fi)) bad = 1.0;
  }
  lsum = block_sum(lsum, sh);
  cnt = block_sum(cnt, sh);
  dmax = block_max(dmax, sh);
  bad = block_max(bad, sh);
  if (threadIdx.x == 0) {
    double* p = part + (k * nb + b) * 4;
    p[0] = lsum;
    p[1] = cnt;
    p[2] = dmax;
    p[3] = bad;
  }
}

template <typename scalar_t>
__global__ void loss_final(const double* part, double alpha, int64_t n, int64_t nb, scalar_t* loss, int64_t* nd,
                           scalar_t* dout) {
  __shared__ double sh[kThreads];
  const int64_t k = blockIdx.x;
  double lsum = 0.0, cnt = 0.0, dmax = 0.0, bad = 0.0;
  for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) {
    const double* p = part + (k * nb + b) * 4;
    lsum += p[0];
    cnt += p[1];
    dmax = fmax(dmax, p[2]);
    bad = fmax(bad, p[3]);
  }
  lsum = block_sum(lsum, sh);
  cnt = block_sum(cnt, sh);
  dmax = block_max(dmax, sh);
  bad = block_max(bad, sh);
  if (threadIdx.x == 0) {
    const double nan = __longlong_as_double(0x7ff8000000000000ULL);
    loss[k] = (scalar_t)(bad > 0.0 ? nan : lsum / (alpha * alpha * (double)n));
    nd[k] = (int64_t)cnt;
    dout[k] = (scalar_t)(bad > 0.0 ? nan : dmax);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_loss_cuda(
    const at::Tensor& f, const at::Tensor& f0, const at::Tensor& y, const at::Tensor& F_prev, double alpha,
    double beta, c10::string_view loss_name) {
  const Loss kind = parse_loss(loss_name, "flow_loss");
  check_cuda(f, "flow_loss", "f");
  check_loss_args(f, f0, y, F_prev, alpha, beta, kind);
  const int64_t K = f.size(0), n = f.size(1);
  TORCH_CHECK(n > 0, "flow_loss: needs at least one point");
  const c10::cuda::CUDAGuard guard(f.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor F = at::empty_like(f), r = at::empty_like(f);
  at::Tensor loss = at::empty({K}, f.options()), dout = at::empty({K}, f.options());
  at::Tensor nd = at::empty({K}, f.options().dtype(at::kLong));
  if (K == 0) return {F, r, loss, nd, dout};
  const int64_t nb = (n + kLossBlock - 1) / kLossBlock;
  at::Tensor part = at::empty({K, nb, 4}, f.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "flow_loss_cuda", [&] {
    loss_partial<scalar_t><<<dim3((unsigned)nb, (unsigned)K), kThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), f0.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), F_prev.data_ptr<scalar_t>(), alpha,
        beta, kind, F.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), part.data_ptr<double>(), n, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss_final<scalar_t><<<(unsigned)K, kThreads, 0, stream>>>(part.data_ptr<double>(), alpha, n, nb,
                                                               loss.data_ptr<scalar_t>(), nd.data_ptr<int64_t>(),
                                                               dout.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {F, r, loss, nd, dout};
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CUDA, m) {
  m.impl("flow_step", &flow_step_cuda);
  m.impl("flow_grad_stats", &flow_grad_stats_cuda);
  m.impl("flow_loss", &flow_loss_cuda);
}

}  // namespace ntk_fast
