// Shared argument checks and constants of the gradient-flow ops (CPU and CUDA kernels).
//
//   flow_step(w, g, v, dt, tau, w_out!, v_out!)      trial weights of K nets stored row-wise in (K, P) buffers
//   flow_grad_stats(g, gp) -> (K, 2)                 [|g'|^2, |g - g'|^2] per net, accumulated in float64
//   flow_loss(f, f0, y, F_prev, alpha, beta, loss)   -> F, r, loss, nd, dout  (see flow_cpu.cpp)
//   softplus_act(z, s, beta, c)                      the hidden layers' activation, in place (see act_cpu.cpp)
//
// All reductions use a fixed block partition (independent of the number of threads) whose partial
// results are combined in a fixed order, so results are bitwise reproducible run to run: the trainer's
// bit-for-bit resume relies on it.
#pragma once
#include <ATen/ATen.h>

#include "../common/loss.h"

namespace ntk_fast {
namespace flow {

constexpr int64_t kStatsBlock = 8192;  // elements per partial sum in flow_grad_stats
constexpr int64_t kLossBlock = 2048;   // points per partial sum in flow_loss

inline void check_rows(const at::Tensor& t, const char* op, const char* name, int64_t K, int64_t P,
                       const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == P, op, ": ", name, " must have shape (", K, ", ", P,
              "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Returns true when the momentum buffers are used (tau > 0).
inline bool check_step_args(const at::Tensor& w, const at::Tensor& g, const at::Tensor& v, const at::Tensor& dt,
                            double tau, const at::Tensor& w_out, const at::Tensor& v_out) {
  const char* op = "flow_step";
  check_float(w, op, "w");
  TORCH_CHECK(w.dim() == 2, op, ": w must be 2-D (nets x parameters), got shape ", w.sizes());
  const int64_t K = w.size(0), P = w.size(1);
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
  check_rows(g, op, "g", K, P, w);
  check_rows(w_out, op, "w_out", K, P, w);
  TORCH_CHECK(dt.dim() == 1 && dt.size(0) == K, op, ": dt must have shape (", K, "), got ", dt.sizes());
  TORCH_CHECK(dt.scalar_type() == w.scalar_type() && dt.device() == w.device() && dt.is_contiguous(), op,
              ": dt must be a contiguous ", w.scalar_type(), " tensor on ", w.device());
  TORCH_CHECK(tau >= 0.0, op, ": tau must be >= 0, got ", tau);
  const bool momentum = tau > 0.0;
  if (momentum) {
    check_rows(v, op, "v", K, P, w);
    check_rows(v_out, op, "v_out", K, P, w);
  }
  return momentum;
}

inline void check_stats_args(const at::Tensor& g, const at::Tensor& gp) {
  const char* op = "flow_grad_stats";
  check_float(g, op, "g");
  TORCH_CHECK(g.dim() == 2, op, ": g must be 2-D (nets x parameters), got shape ", g.sizes());
  TORCH_CHECK(g.is_contiguous(), op, ": g must be contiguous");
  check_rows(gp, op, "gp", g.size(0), g.size(1), g);
}

inline void check_loss_args(const at::Tensor& f, const at::Tensor& f0, const at::Tensor& y,
                            const at::Tensor& F_prev, double alpha, double beta, Loss kind) {
  const char* op = "flow_loss";
  check_float(f, op, "f");
  TORCH_CHECK(f.dim() == 2, op, ": f must be 2-D (nets x points), got shape ", f.sizes());
  TORCH_CHECK(f.is_contiguous(), op, ": f must be contiguous");
  const int64_t K = f.size(0), n = f.size(1);
  check_rows(f0, op, "f0", K, n, f);
  check_rows(F_prev, op, "F_prev", K, n, f);
  TORCH_CHECK(y.dim() == 1 && y.size(0) == n, op, ": y must have shape (", n, "), got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == f.scalar_type() && y.device() == f.device() && y.is_contiguous(), op,
              ": y must be a contiguous ", f.scalar_type(), " tensor on ", f.device());
  TORCH_CHECK(alpha > 0.0, op, ": alpha must be > 0, got ", alpha);
  TORCH_CHECK(kind != Loss::SoftHinge || beta > 0.0, op, ": softhinge needs beta > 0, got ", beta);
}

// softplus_act(z!, s!, beta, c): z contiguous float32/float64, s empty or z's twin (not aliasing z).
// Returns true when s is to be written.
inline bool check_act_args(const at::Tensor& z, const at::Tensor& s, double beta) {
  const char* op = "softplus_act";
  check_float(z, op, "z");
  TORCH_CHECK(z.is_contiguous(), op, ": z must be contiguous");
  TORCH_CHECK(beta > 0.0, op, ": beta must be > 0, got ", beta);
  const bool keep = s.numel() > 0;
  if (keep) {
    TORCH_CHECK(s.sizes() == z.sizes() && s.scalar_type() == z.scalar_type() && s.device() == z.device() &&
                    s.is_contiguous(),
                op, ": s must be a contiguous ", z.scalar_type(), " tensor of shape ", z.sizes(), " on ",
                z.device(), " (or empty), got ", s.scalar_type(), " of shape ", s.sizes());
    TORCH_CHECK(s.data_ptr() != z.data_ptr(), op, ": s and z must not share memory");
  }
  return keep;
}

}  // namespace flow
}  // namespace ntk_fast
