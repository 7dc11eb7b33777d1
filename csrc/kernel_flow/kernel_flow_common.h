// Shared argument checks and the packed symmetric layout of ntk_fast::kernel_flow_step (CPU and CUDA).
//
// (packed layout: csrc/common/packed.h)
#pragma once
#include <ATen/ATen.h>
#include <string>

#include "../common/loss.h"
#include "../common/packed.h"

namespace ntk_fast {

struct FlowShape {
  int64_t E, n;
  bool shared;  // one Theta for all E problems
};

inline FlowShape check_flow_args(const at::Tensor& theta, const at::Tensor& y, const at::Tensor& f,
                                 const at::Tensor& g, const at::Tensor& r, const at::Tensor& c,
                                 const at::Tensor& dt, const at::Tensor& active, int64_t packed_block) {
  TORCH_CHECK(f.dim() == 2, "kernel_flow_step: f must be 2-D (problems x points), got shape ", f.sizes());
  const int64_t E = f.size(0), n = f.size(1);
  TORCH_CHECK(E >= 1 && n >= 1, "kernel_flow_step: f must be non-empty, got shape ", f.sizes());
  const auto dtype = f.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "kernel_flow_step: f must be float32 or float64, got ",
              dtype);
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == f.sizes(), "kernel_flow_step: ", name, " must have shape ", f.sizes(), " like f, got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "kernel_flow_step: ", name, " has dtype ", t.scalar_type(),
                " but f has ", dtype);
    TORCH_CHECK(t.device() == f.device(), "kernel_flow_step: ", name, " is on ", t.device(), " but f is on ",
                f.device());
  };
  same(y, "y");
  same(g, "g");
  same(r, "r");
  same(c, "c");
  TORCH_CHECK(dt.dim() == 1 && dt.size(0) == E, "kernel_flow_step: dt must have shape (", E, "), got ", dt.sizes());
  TORCH_CHECK(dt.scalar_type() == dtype && dt.device() == f.device(), "kernel_flow_step: dt must be ", dtype,
              " on ", f.device());
  TORCH_CHECK(active.dim() == 1 && active.size(0) == E && active.scalar_type() == at::kBool,
              "kernel_flow_step: active must be a bool tensor of shape (", E, "), got ", active.scalar_type(), " ",
              active.sizes());
  TORCH_CHECK(active.device() == f.device(), "kernel_flow_step: active is on ", active.device(), " but f is on ",
              f.device());
  TORCH_CHECK(theta.scalar_type() == dtype, "kernel_flow_step: theta has dtype ", theta.scalar_type(),
              " but f has ", dtype);
  TORCH_CHECK(theta.device() == f.device(), "kernel_flow_step: theta is on ", theta.device(), " but f is on ",
              f.device());
  bool shared;
  if (packed_block == 0) {
    TORCH_CHECK((theta.dim() == 2 || theta.dim() == 3) && theta.size(-1) == n && theta.size(-2) == n,
                "kernel_flow_step: theta must have shape (", n, ", ", n, ") or (", E, ", ", n, ", ", n, "), got ",
                theta.sizes());
    shared = theta.dim() == 2;
    TORCH_CHECK(shared || theta.size(0) == E, "kernel_flow_step: theta has ", theta.size(0),
                " kernels but there are ", E, " problems");
  } else {
    TORCH_CHECK(packed_block > 0, "kernel_flow_step: packed_block must be >= 0, got ", packed_block);
    const int64_t P = packed_size(n, packed_block);
    TORCH_CHECK((theta.dim() == 1 || theta.dim() == 2) && theta.size(-1) == P,
                "kernel_flow_step: packed theta (block ", packed_block, ", n ", n, ") must have shape (", P,
                ") or (", E, ", ", P, "), got ", theta.sizes());
    shared = theta.dim() == 1;
    TORCH_CHECK(shared || theta.size(0) == E, "kernel_flow_step: theta has ", theta.size(0),
                " kernels but there are ", E, " problems");
  }
  return {E, n, shared};
}

}  // namespace ntk_fast
