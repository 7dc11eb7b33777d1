// CPU kernel of softplus_act, the trainer's fused activation (schema in csrc/register.cpp):
//
//   x = beta z,  e = exp(-|x|)
//   z <- ca (max(x, 0) + log1p(e))          = ca softplus(x)          (in place; ca = c / beta)
//   s <- cs (x >= 0 ? 1 / (1 + e) : e / (1 + e)) = cs sigmoid(x)       (when s is not empty)
//
// One exp, one log1p and one division per element, and no overflow for any x (the naive log1p(exp(x))
// overflows for x > 88 in float32).  One read of z and one or two writes, where torch ops take five passes.
// The vector paths call the SLEEF functions that libtorch_cpu exports (looked up at run time, so a torch
// build without them only loses speed) from AVX-512 or AVX2 code chosen by cpuid; otherwise ATen's
// sigmoid and softplus with an exact threshold.  Elementwise: the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <dlfcn.h>
#if defined(__x86_64__) && defined(__GNUC__)
#define NTK_FAST_ACT_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "flow_common.h"

namespace ntk_fast {
namespace {

#ifdef NTK_FAST_ACT_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
using Vd8 = __m512d (*)(__m512d);
using Vf16 = __m512 (*)(__m512);
using Vd4 = __m256d (*)(__m256d);
using Vf8 = __m256 (*)(__m256);
#pragma GCC diagnostic pop

struct Sleef {
  Vd8 exp_d8 = nullptr, log1p_d8 = nullptr;
  Vf16 exp_f16 = nullptr, log1p_f16 = nullptr;
  Vd4 exp_d4 = nullptr, log1p_d4 = nullptr;
  Vf8 exp_f8 = nullptr, log1p_f8 = nullptr;
  bool avx512 = false, avx2 = false;
};

void* find_symbol(const char* name) {
  void* p = dlsym(RTLD_DEFAULT, name);
  if (p) return p;
  static void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  return lib ? dlsym(lib, name) : nullptr;
}

const Sleef& sleef() {
  static const Sleef fns = [] {
    Sleef s;
    // NTK_FAST_ACT_ISA=avx2 | scalar caps the path (to test and time each one on a machine that has them all)
    const char* cap = std::getenv("NTK_FAST_ACT_ISA");
    const std::string isa = cap ? cap : "";
    if (isa == "scalar") return s;
    __builtin_cpu_init();
    s.exp_d8 = (Vd8)find_symbol("Sleef_expd8_u10");
    s.log1p_d8 = (Vd8)find_symbol("Sleef_log1pd8_u10");
    s.exp_f16 = (Vf16)find_symbol("Sleef_expf16_u10");
    s.log1p_f16 = (Vf16)find_symbol("Sleef_log1pf16_u10");
    s.exp_d4 = (Vd4)find_symbol("Sleef_expd4_u10avx2");
    s.log1p_d4 = (Vd4)find_symbol("Sleef_log1pd4_u10avx2");
    s.exp_f8 = (Vf8)find_symbol("Sleef_expf8_u10avx2");
    s.log1p_f8 = (Vf8)find_symbol("Sleef_log1pf8_u10avx2");
    s.avx512 = isa != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && s.exp_d8 &&
               s.log1p_d8 && s.exp_f16 && s.log1p_f16;
    s.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && s.exp_d4 && s.log1p_d4 &&
             s.exp_f8 && s.log1p_f8;
    return s;
  }();
  return fns;
}

// Scalar loop for the tails of the vector loops.
template <typename T>
void act_scalar(T* z, T* s, int64_t i0, int64_t i1, T beta, T ca, T cs) {
  for (int64_t i = i0; i < i1; ++i) {
    const T x = beta * z[i];
    const T e = std::exp(-std::abs(x));
    if (s) {
      const T inv = T(1) / (T(1) + e);
      s[i] = cs * (x >= T(0) ? inv : e * inv);
    }
    z[i] = ca * ((x > T(0) ? x : (x == x ? T(0) : x)) + std::log1p(e));
  }
}

__attribute__((target("avx512f,avx512dq"))) void act_avx512(double* z, double* s, int64_t i0, int64_t i1,
                                                              double beta, double ca, double cs, const Sleef& f) {
  const __m512d vb = _mm512_set1_pd(beta), va = _mm512_set1_pd(ca), vs = _mm512_set1_pd(cs);
  const __m512d one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd();
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m512d x = _mm512_mul_pd(_mm512_loadu_pd(z + i), vb);
    const __m512d e = f.exp_d8(_mm512_sub_pd(zero, _mm512_abs_pd(x)));
    if (s) {
      const __m512d inv = _mm512_div_pd(one, _mm512_add_pd(one, e));
      const __mmask8 neg = _mm512_cmp_pd_mask(x, zero, _CMP_LT_OQ);
      _mm512_storeu_pd(s + i, _mm512_mul_pd(vs, _mm512_mask_mul_pd(inv, neg, inv, e)));
    }
    // max(x, 0) keeps a NaN x (operand order: the first operand is returned when either is NaN)
    const __m512d sp = _mm512_add_pd(_mm512_max_pd(zero, x), f.log1p_d8(e));
    _mm512_storeu_pd(z + i, _mm512_mul_pd(va, sp));
  }
  act_scalar<double>(z, s, i, i1, beta, ca, cs);
}

__attribute__((target("avx512f,avx512dq"))) void act_avx512(float* z, float* s, int64_t i0, int64_t i1, float beta,
                                                              float ca, float cs, const Sleef& f) {
  const __m512 vb = _mm512_set1_ps(beta), va = _mm512_set1_ps(ca), vs = _mm512_set1_ps(cs);
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(z + i), vb);
    const __m512 e = f.exp_f16(_mm512_sub_ps(zero, _mm512_abs_ps(x)));
    if (s) {
      const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
      const __mmask16 neg = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
      _mm512_storeu_ps(s + i, _mm512_mul_ps(vs, _mm512_mask_mul_ps(inv, neg, inv, e)));
    }
    const __m512 sp = _mm512_add_ps(_mm512_max_ps(zero, x), f.log1p_f16(e));
    _mm512_storeu_ps(z + i, _mm512_mul_ps(va, sp));
  }
  act_scalar<float>(z, s, i, i1, beta, ca, cs);
}

__attribute__((target("avx2,fma"))) void act_avx2(double* z, double* s, int64_t i0, int64_t i1, double beta,
                                                  double ca, double cs, const Sleef& f) {
  const __m256d vb = _mm256_set1_pd(beta), va = _mm256_set1_pd(ca), vs = _mm256_set1_pd(cs);
  const __m256d one = _mm256_set1_pd(1.0), zero = _mm256_setzero_pd(), sign = _mm256_set1_pd(-0.0);
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const __m256d x = _mm256_mul_pd(_mm256_loadu_pd(z + i), vb);
    const __m256d e = f.exp_d4(_mm256_or_pd(x, sign));  // -|x|
    if (s) {
      const __m256d inv = _mm256_div_pd(one, _mm256_add_pd(one, e));
      const __m256d neg = _mm256_cmp_pd(x, zero, _CMP_LT_OQ);
      _mm256_storeu_pd(s + i, _mm256_mul_pd(vs, _mm256_blendv_pd(inv, _mm256_mul_pd(inv, e), neg)));
    }
    const __m256d sp = _mm256_add_pd(_mm256_max_pd(zero, x), f.log1p_d4(e));
    _mm256_storeu_pd(z + i, _mm256_mul_pd(va, sp));
  }
  act_scalar<double>(z, s, i, i1, beta, ca, cs);
}

__attribute__((target("avx2,fma"))) void act_avx2(float* z, float* s, int64_t i0, int64_t i1, float beta, float ca,
                                                  float cs, const Sleef& f) {
  const __m256 vb = _mm256_set1_ps(beta), va = _mm256_set1_ps(ca), vs = _mm256_set1_ps(cs);
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(z + i), vb);
    const __m256 e = f.exp_f8(_mm256_or_ps(x, sign));
    if (s) {
      const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
      const __m256 neg = _mm256_cmp_ps(x, zero, _CMP_LT_OQ);
      _mm256_storeu_ps(s + i, _mm256_mul_ps(vs, _mm256_blendv_ps(inv, _mm256_mul_ps(inv, e), neg)));
    }
    const __m256 sp = _mm256_add_ps(_mm256_max_ps(zero, x), f.log1p_f8(e));
    _mm256_storeu_ps(z + i, _mm256_mul_ps(va, sp));
  }
  act_scalar<float>(z, s, i, i1, beta, ca, cs);
}

#else
struct Sleef {
  bool avx512 = false, avx2 = false;
};
const Sleef& sleef() {
  static const Sleef fns;
  return fns;
}
template <typename T>
void act_avx512(T*, T*, int64_t, int64_t, T, T, T, const Sleef&) {}
template <typename T>
void act_avx2(T*, T*, int64_t, int64_t, T, T, T, const Sleef&) {}
#endif  // NTK_FAST_ACT_X86

void softplus_act_cpu(at::Tensor z, at::Tensor s, double beta, double c) {
  TORCH_CHECK(z.device().is_cpu(), "softplus_act: CPU kernel called with a tensor on ", z.device());
  const bool keep = flow::check_act_args(z, s, beta);
  const int64_t n = z.numel();
  if (n == 0) return;
  const Sleef& f = sleef();
  if (!f.avx512 && !f.avx2) {  // no vector path: ATen's own vectorised ops, the same passes as the torch code
    // softplus(x) is x to rounding once e^-x / x < eps (x > 20 in float32, 40 in float64): that threshold
    // avoids the overflow at the cost of nothing
    if (keep) at::mul_out(s, at::sigmoid(z * beta), c);
    const double threshold = z.scalar_type() == at::kDouble ? 40.0 : 20.0;
    at::mul_out(z, at::softplus(z, beta, threshold), c);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "softplus_act_cpu", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* sp = keep ? s.data_ptr<scalar_t>() : nullptr;
    const scalar_t b = (scalar_t)beta, ca = (scalar_t)(c / beta), cs = (scalar_t)c;
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      if (f.avx512)
        act_avx512(zp, sp, i0, i1, b, ca, cs, f);
      else
        act_avx2(zp, sp, i0, i1, b, ca, cs, f);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CPU, m) { m.impl("softplus_act", &softplus_act_cpu); }

}  // namespace ntk_fast
