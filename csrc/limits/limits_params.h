// Host side of the limit_kernels op, shared by the CPU and CUDA entry points: the per-entry recursion's
// parameters (limits::Params) filled from the op's checked, contiguous float64 tensors.  The tensors must
// outlive the returned Params (it holds their data pointers).
#pragma once
#include <ATen/ATen.h>

#include "limits_common.h"

namespace ntk_fast {
namespace limits {

inline Params make_params(int mode, int64_t L, int64_t n1, int64_t n2, const at::Tensor& q1c, const at::Tensor& q2c,
                          const at::Tensor& table, const at::Tensor& nodes, const at::Tensor& weights, double beta,
                          double c, double bias) {
  Params P;
  const bool has_table = table.numel() > 0;
  P.mode = mode;
  P.L = L;
  P.n1 = n1;
  P.n2 = n2;
  P.K = has_table ? table.size(2) - 1 : 0;
  P.m = nodes.numel();
  P.beta = beta;
  P.c = c;
  P.b2 = bias * bias;
  P.q1 = q1c.data_ptr<double>();
  P.q2 = q2c.data_ptr<double>();
  P.table = has_table ? table.data_ptr<double>() : nullptr;
  P.x = P.m ? nodes.data_ptr<double>() : nullptr;
  P.w = P.m ? weights.data_ptr<double>() : nullptr;
  return P;
}

}  // namespace limits
}  // namespace ntk_fast
