// Per-entry recursion of the infinite-width kernels (shared by the CPU and CUDA kernels; maths in
// ntk_fast/ops/reference_limits.py and docs/limits.md).  Everything is evaluated in double.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define NTKF_HD __host__ __device__ inline
#else
#define NTKF_HD inline
#endif

namespace ntk_fast {
namespace limits {

enum Mode : int { kTable = 0, kRelu = 1, kSoftplus = 2, kTanh = 3 };

struct Params {
  int mode;
  int64_t L, n1, n2, K, m;
  double beta, c, b2;
  const double* q1;     // (L, n1)
  const double* q2;     // (L, n2)
  const double* table;  // (L, 4, K + 1)
  const double* x;      // (m) quadrature nodes
  const double* w;      // (m) weights, summing to 1
};

NTKF_HD void act_pair(int mode, double beta, double z, double& s, double& ds) {
  if (mode == kSoftplus) {  // softplus(beta z) / beta and sigmoid(beta z), one exp, no overflow
    const double y = beta * z, e = exp(-fabs(y));
    s = ((y > 0 ? y : 0.0) + log1p(e)) / beta;
    ds = y >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
  } else {
    const double t = tanh(z);
    s = t;
    ds = 1.0 - t * t;
  }
}

// Four-point Lagrange interpolation of tab[0..K] (at t = j / K) at t in [0, 1].
NTKF_HD double cubic(const double* tab, int64_t K, double t) {
  int64_t j0 = (int64_t)floor(t * K) - 1;
  j0 = j0 < 0 ? 0 : (j0 > K - 3 ? K - 3 : j0);
  const double p = t * K - (double)j0;
  const double* f = tab + j0;
  return -f[0] * (p - 1) * (p - 2) * (p - 3) / 6 + f[1] * p * (p - 2) * (p - 3) / 2 -
         f[2] * p * (p - 1) * (p - 3) / 2 + f[3] * p * (p - 1) * (p - 2) / 6;
}

// (E[sigma(u) sigma(v)], E[sigma'(u) sigma'(v)]) for Var u = qa, Var v = qb, correlation rho, layer l.
NTKF_HD void layer_maps(const Params& P, int64_t l, double qa, double qb, double rho, double& e, double& ed) {
  if (P.mode == kTable) {
    const double* tab = P.table + l * 4 * (P.K + 1);
    if (rho >= 0) {
      const double t = sqrt(1.0 - rho);
      e = cubic(tab, P.K, t);
      ed = cubic(tab + (P.K + 1), P.K, t);
    } else {
      const double s = sqrt(1.0 + rho);
      e = cubic(tab + 2 * (P.K + 1), P.K, s);
      ed = cubic(tab + 3 * (P.K + 1), P.K, s);
    }
    return;
  }
  const double k = P.c * P.c;
  if (P.mode == kRelu) {  // arc-cosine kernels of degree 1 and 0
    const double th = acos(rho), pi = 3.14159265358979323846;
    const double r = 1.0 - rho * rho;
    e = k / (2 * pi) * sqrt(qa * qb) * (sqrt(r > 0 ? r : 0.0) + (pi - th) * rho);
    ed = k / (2 * pi) * (pi - th);
    return;
  }
  const double sa = sqrt(qa), sb = sqrt(qb), r = 1.0 - rho * rho, sr = sqrt(r > 0 ? r : 0.0);
  double acc = 0, dacc = 0;
  for (int64_t a = 0; a < P.m; ++a) {
    double fu, dfu;
    act_pair(P.mode, P.beta, sa * P.x[a], fu, dfu);
    const double base = rho * P.x[a];
    double in = 0, din = 0;
    for (int64_t b = 0; b < P.m; ++b) {
      double gv, dgv;
      act_pair(P.mode, P.beta, sb * (base + sr * P.x[b]), gv, dgv);
      in += P.w[b] * gv;
      din += P.w[b] * dgv;
    }
    acc += P.w[a] * fu * in;
    dacc += P.w[a] * dfu * din;
  }
  e = k * acc;
  ed = k * dacc;
}

// One entry: s0 = x1_i . x2_j / d in, (nngp, ntk) out.  diag: a symmetric diagonal entry (rho = 1 exactly).
NTKF_HD void entry(const Params& P, int64_t i, int64_t j, double s0, bool diag, double& nngp, double& ntk) {
  double s = s0, t = s0 + P.b2;
  for (int64_t l = 0; l < P.L; ++l) {
    const double qa = P.q1[l * P.n1 + i], qb = P.q2[l * P.n2 + j], den = sqrt(qa * qb);
    double rho = diag ? 1.0 : (den > 0 ? s / den : 0.0);
    rho = rho > 1.0 ? 1.0 : (rho < -1.0 ? -1.0 : rho);
    double e, ed;
    layer_maps(P, l, qa, qb, rho, e, ed);
    s = e;
    t = e + P.b2 + ed * t;
  }
  nngp = s;
  ntk = t;
}

}  // namespace limits
}  // namespace ntk_fast
