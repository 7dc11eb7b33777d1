// CUDA kernel of softplus_act (see act_cpu.cpp for the formulas): one thread per element, grid-stride loop.
// float64 uses the IEEE exp / log1p; float32 gets the fast exp of the build's --use_fast_math (a few ulp here:
// the argument is -|x| <= 0, so exp(-|x|) <= 1).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "flow_common.h"

namespace ntk_fast {
namespace {

template <typename T>
__global__ void act_kernel(T* __restrict__ z, T* __restrict__ s, int64_t n, T beta, T ca, T cs) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const T x = beta * z[i];
    const T e = exp(-fabs(x));
    if (s) {
      const T inv = T(1) / (T(1) + e);
      s[i] = cs * (x >= T(0) ? inv : e * inv);
    }
    z[i] = ca * ((x > T(0) ? x : (x == x ? T(0) : x)) + log1p(e));
  }
}

void softplus_act_cuda(at::Tensor z, at::Tensor s, double beta, double c) {
  TORCH_CHECK(z.is_cuda(), "softplus_act: CUDA kernel called with a tensor on ", z.device());
  const bool keep = flow::check_act_args(z, s, beta);
  const int64_t n = z.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "softplus_act_cuda", [&] {
    act_kernel<scalar_t><<<(unsigned)blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), keep ? s.data_ptr<scalar_t>() : nullptr, n, (scalar_t)beta,
        (scalar_t)(c / beta), (scalar_t)c);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CUDA, m) { m.impl("softplus_act", &softplus_act_cuda); }

}  // namespace ntk_fast
