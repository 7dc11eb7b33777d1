// The losses of the trainer (flow_loss) and of the frozen-kernel solver (kernel_flow_step): one enum, one
// parser, one host+device evaluation.  Conventions (docs/design.md, "Losses"):
//
//   margin losses, labels y in {-1, +1}, u = y F:
//     softhinge  l = softplus(beta (1 - u)) / beta     dl/du = -sigmoid(beta (1 - u))
//     qhinge     l = 0.5 relu(1 - u)^2                 dl/du = -relu(1 - u)
//     hinge      l = relu(1 - u)                       dl/du = -[u < 1]
//   and dl/dF = y dl/du;
//   residual loss, real targets y:
//     mse        l = 0.5 (F - y)^2                     dl/dF = F - y
//
// softplus and sigmoid are evaluated without overflow from e = exp(-|x|) in (0, 1].
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#if defined(__CUDACC__)
#define NTK_HD __host__ __device__ __forceinline__
#else
#define NTK_HD inline
#endif

namespace ntk_fast {

enum class Loss : int { SoftHinge = 0, QHinge = 1, Hinge = 2, Mse = 3 };

// Parses the `str loss` argument of the ops; the error names the op.
inline Loss parse_loss(c10::string_view name, const char* op) {
  if (name == "softhinge") return Loss::SoftHinge;
  if (name == "qhinge") return Loss::QHinge;
  if (name == "hinge") return Loss::Hinge;
  if (name == "mse") return Loss::Mse;
  TORCH_CHECK(false, op, ": loss must be 'softhinge', 'qhinge', 'hinge' or 'mse', got '", std::string(name), "'");
  return Loss::SoftHinge;
}

// True for the margin losses (labels +-1, a margin stop); false for mse (real targets).
NTK_HD bool is_margin(Loss kind) { return kind != Loss::Mse; }

// l and dl/dF at output F with label/target y.  T = float or double; beta is used by softhinge only.
template <typename T>
NTK_HD void loss_and_grad(Loss kind, T beta, T F, T y, T& l, T& dl) {
  using std::exp;
  using std::fabs;
  using std::log1p;
  if (kind == Loss::Mse) {
    const T m = F - y;
    l = T(0.5) * m * m;
    dl = m;
    return;
  }
  const T u = y * F;
  T lp;
  if (kind == Loss::SoftHinge) {
    const T x = beta * (T(1) - u);
    const T e = exp(-fabs(x));
    l = ((x > T(0) ? x : T(0)) + log1p(e)) / beta;
    lp = x >= T(0) ? -T(1) / (T(1) + e) : -e / (T(1) + e);
  } else if (kind == Loss::QHinge) {
    const T m = u < T(1) ? T(1) - u : T(0);
    l = T(0.5) * m * m;
    lp = -m;
  } else {  // Hinge
    l = u < T(1) ? T(1) - u : T(0);
    lp = u < T(1) ? -T(1) : T(0);
  }
  dl = lp * y;
}

}  // namespace ntk_fast
