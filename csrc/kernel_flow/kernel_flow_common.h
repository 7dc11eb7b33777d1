// Shared argument checks and the packed symmetric layout of ntk_fast::kernel_flow_step (CPU and CUDA).
//
// Packed layout ("tile-packed upper triangle"): with tile edge T and nt = ceil(n / T) tile rows, the tiles
// (bi, bj) with bi <= bj are stored one after the other in row-major order of (bi, bj); each tile is a dense
// T x T row-major block (diagonal tiles hold the full symmetric block, edge tiles are zero-padded).
//   tile_index(bi, bj) = bi * nt - bi * (bi - 1) / 2 + (bj - bi),   packed size P = nt (nt + 1) / 2 * T^2.
#pragma once
#include <ATen/ATen.h>
#include <string>

namespace ntk_fast {

enum LossKind : int { LOSS_SOFTHINGE = 0, LOSS_QHINGE = 1, LOSS_MSE = 2 };

inline int loss_kind(const std::string& loss) {
  if (loss == "softhinge") return LOSS_SOFTHINGE;
  if (loss == "qhinge") return LOSS_QHINGE;
  if (loss == "mse") return LOSS_MSE;
  TORCH_CHECK(false, "kernel_flow_step: loss must be 'softhinge', 'qhinge' or 'mse', got '", loss, "'");
  return -1;
}

inline int64_t packed_tiles_per_side(int64_t n, int64_t T) { return (n + T - 1) / T; }
inline int64_t packed_size(int64_t n, int64_t T) {
  const int64_t nt = packed_tiles_per_side(n, T);
  return nt * (nt + 1) / 2 * T * T;
}
inline int64_t packed_tile_index(int64_t bi, int64_t bj, int64_t nt) { return bi * nt - bi * (bi - 1) / 2 + (bj - bi); }

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
