// CPU kernels of the gradient-flow ops (see flow_common.h for the schemas).
//
// flow_step: one pass over the (K, P) parameter buffer of K nets, net k with its own dt[k]:
//     tau == 0:  w_out = w - dt g
//     tau  > 0:  x = exp(-dt / tau),  v_out = x v - (1 - x) g,  w_out = w + dt v_out
//   Reads 2P (3P) and writes P (2P) numbers per net; memory-bound, threads take fixed blocks.
// flow_grad_stats: one pass over g, g' returning [|g'|^2, |g - g'|^2] per net (float64 accumulation),
//   from which the step rule forms dgrad = |g - g'|^2 / (|g| |g'|).
// flow_loss: one pass over the outputs of K nets on n training points:
//     F = alpha (f - f0),  loss = 1/(alpha^2 n) sum_i l(F_i, y_i),  r_i = dl/dF(F_i, y_i) / (alpha n) = dL/df_i,
//     nd = #{i : y_i F_i < 1},  dout = max_i |F_i - F_prev_i|   (NaN when some F is not finite)
//   with l one of the losses of csrc/common/loss.h (margin losses on u = y F; mse = 0.5 (F - y)^2).
//   r is the seed of the backward pass: dL/dW(l) = delta(l+1)^T a(l) with delta(L+1) = r.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "flow_common.h"

namespace ntk_fast {
namespace {
using namespace ntk_fast::flow;

template <typename scalar_t>
void step_kernel(const scalar_t* w, const scalar_t* g, const scalar_t* v, const scalar_t* dt, double tau,
                 scalar_t* wo, scalar_t* vo, int64_t K, int64_t P) {
  constexpr int64_t B = 16384;
  const int64_t nb = (P + B - 1) / B;
  at::parallel_for(0, K * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t k = blk / nb, i0 = (blk % nb) * B, i1 = std::min(P, i0 + B);
      const int64_t o = k * P;
      const scalar_t h = dt[k];
      if (tau > 0.0) {
        const scalar_t x = (scalar_t)std::exp(-(double)h / tau), omx = (scalar_t)1 - x;
        for (int64_t i = o + i0; i < o + i1; ++i) {
          const scalar_t vn = x * v[i] - omx * g[i];
          vo[i] = vn;
          wo[i] = w[i] + h * vn;
        }
      } else {
        for (int64_t i = o + i0; i < o + i1; ++i) wo[i] = w[i] - h * g[i];
      }
    }
  });
}

void flow_step_cpu(const at::Tensor& w, const at::Tensor& g, const at::Tensor& v, const at::Tensor& dt, double tau,
                   at::Tensor w_out, at::Tensor v_out) {
  const bool momentum = check_step_args(w, g, v, dt, tau, w_out, v_out);
  TORCH_CHECK(w.device().is_cpu(), "flow_step: CPU kernel called with a tensor on ", w.device());
  const int64_t K = w.size(0), P = w.size(1);
  if (K == 0 || P == 0) return;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "flow_step_cpu", [&] {
    step_kernel<scalar_t>(w.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                          momentum ? v.data_ptr<scalar_t>() : nullptr, dt.data_ptr<scalar_t>(), tau,
                          w_out.data_ptr<scalar_t>(), momentum ? v_out.data_ptr<scalar_t>() : nullptr, K, P);
  });
}

template <typename scalar_t>
void stats_kernel(const scalar_t* g, const scalar_t* gp, double* out, int64_t K, int64_t P) {
  const int64_t B = kStatsBlock, nb = (P + B - 1) / B;
  std::vector<double> part((size_t)(K * nb * 2), 0.0);
  at::parallel_for(0, K * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t k = blk / nb, i0 = k * P + (blk % nb) * B, i1 = k * P + std::min(P, (blk % nb) * B + B);
      double s1 = 0.0, s2 = 0.0;
      for (int64_t i = i0; i < i1; ++i) {
        const double b = (double)gp[i], dd = (double)g[i] - b;
        s1 += b * b;
        s2 += dd * dd;
      }
      part[2 * blk] = s1;
      part[2 * blk + 1] = s2;
    }
  });
  for (int64_t k = 0; k < K; ++k) {  // fixed-order combination: independent of the thread count
    double s1 = 0.0, s2 = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      s1 += part[2 * (k * nb + b)];
      s2 += part[2 * (k * nb + b) + 1];
    }
    out[2 * k] = s1;
    out[2 * k + 1] = s2;
  }
}

at::Tensor flow_grad_stats_cpu(const at::Tensor& g, const at::Tensor& gp) {
  check_stats_args(g, gp);
  TORCH_CHECK(g.device().is_cpu(), "flow_grad_stats: CPU kernel called with a tensor on ", g.device());
  const int64_t K = g.size(0), P = g.size(1);
  at::Tensor out = at::zeros({K, 2}, g.options().dtype(at::kDouble));
  if (K == 0 || P == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "flow_grad_stats_cpu", [&] {
    stats_kernel<scalar_t>(g.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(), out.data_ptr<double>(), K, P);
  });
  return out;
}

template <typename scalar_t>
void loss_kernel(const scalar_t* f, const scalar_t* f0, const scalar_t* y, const scalar_t* Fp, double alpha,
                 double beta, Loss kind, scalar_t* F, scalar_t* r, scalar_t* loss, int64_t* nd, scalar_t* dout,
                 int64_t K, int64_t n) {
  const int64_t B = kLossBlock, nb = (n + B - 1) / B;
  struct Part {
    double lsum;
    int64_t cnt;
    double dmax;
    bool bad;
  };
  std::vector<Part> part((size_t)(K * nb));
  const scalar_t a = (scalar_t)alpha, rs = (scalar_t)(1.0 / (alpha * (double)n));
  at::parallel_for(0, K * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t k = blk / nb, j0 = (blk % nb) * B, j1 = std::min(n, j0 + B);
      Part p{0.0, 0, 0.0, false};
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i = k * n + j;
        const scalar_t Fi = a * (f[i] - f0[i]);
        const scalar_t u = y[j] * Fi;
        scalar_t l, dl;
        loss_and_grad<scalar_t>(kind, (scalar_t)beta, Fi, y[j], l, dl);
        F[i] = Fi;
        r[i] = dl * rs;
        p.lsum += (double)l;
        p.cnt += u < (scalar_t)1 ? 1 : 0;
        const double d = std::abs((double)Fi - (double)Fp[i]);
        if (!std::isfinite((double)Fi)) p.bad = true;
        if (d > p.dmax) p.dmax = d;
      }
      part[blk] = p;
    }
  });
  const double norm = 1.0 / (alpha * alpha * (double)n);
  for (int64_t k = 0; k < K; ++k) {
    double lsum = 0.0, dmax = 0.0;
    int64_t cnt = 0;
    bool bad = false;
    for (int64_t b = 0; b < nb; ++b) {
      const Part& p = part[k * nb + b];
      lsum += p.lsum;
      cnt += p.cnt;
      dmax = std::max(dmax, p.dmax);
      bad = bad || p.bad;
    }
    const double nan = std::numeric_limits<double>::quiet_NaN();
    loss[k] = (scalar_t)(bad ? nan : lsum * norm);
    nd[k] = cnt;
    dout[k] = (scalar_t)(bad ? nan : dmax);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_loss_cpu(
    const at::Tensor& f, const at::Tensor& f0, const at::Tensor& y, const at::Tensor& F_prev, double alpha,
    double beta, c10::string_view loss_name) {
  const Loss kind = parse_loss(loss_name, "flow_loss");
  check_loss_args(f, f0, y, F_prev, alpha, beta, kind);
  TORCH_CHECK(f.device().is_cpu(), "flow_loss: CPU kernel called with a tensor on ", f.device());
  const int64_t K = f.size(0), n = f.size(1);
  TORCH_CHECK(n > 0, "flow_loss: needs at least one point");
  at::Tensor F = at::empty_like(f), r = at::empty_like(f);
  at::Tensor loss = at::empty({K}, f.options()), dout = at::empty({K}, f.options());
  at::Tensor nd = at::empty({K}, f.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "flow_loss_cpu", [&] {
    loss_kernel<scalar_t>(f.data_ptr<scalar_t>(), f0.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                          F_prev.data_ptr<scalar_t>(), alpha, beta, kind, F.data_ptr<scalar_t>(),
                          r.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), nd.data_ptr<int64_t>(),
                          dout.data_ptr<scalar_t>(), K, n);
  });
  return {F, r, loss, nd, dout};
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CPU, m) {
  m.impl("flow_step", &flow_step_cpu);
  m.impl("flow_grad_stats", &flow_grad_stats_cpu);
  m.impl("flow_loss", &flow_loss_cpu);
}

}  // namespace ntk_fast
