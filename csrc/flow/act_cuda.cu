// CUDA kernel of softplus_act (see act_cpu.cpp for the formulas): one thread per element, grid-stride loop.
// float64 uses the IEEE exp / log1p / division.  float32 is the one place of the extension with fast math, and
// it is spelled out here rather than by a compiler flag (setup.py builds every .cu without --use_fast_math):
// exp is the hardware __expf (error 2 + 1.16 |x| ulp; the argument is -|x| <= 0, so exp(-|x|) <= 1) and
// 1 / (1 + e) is the approximate __fdividef (2 ulp); log1p stays IEEE.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "flow_common.h"

namespace ntk_fast {
namespace {

__device__ __forceinline__ float act_exp(float x) { return __expf(x); }
__device__ __forceinline__ double act_exp(double x) { return exp(x); }
__device__ __forceinline__ float act_inv1p(float e) { return __fdividef(1.f, 1.f + e); }
__device__ __forceinline__ double act_inv1p(double e) { return 1.0 / (1.0 + e); }

template <typename T>
__global__ void act_kernel(T* __restrict__ z, T* __restrict__ s, int64_t n, T beta, T ca, T cs) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const T x = beta * z[i];
    const T e = act_exp(-fabs(x));
    if (s) {
      const T inv = act_inv1p(e);
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
