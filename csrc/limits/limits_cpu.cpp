// CPU kernel of ntk_fast::limit_kernels: the infinite-width NNGP and NTK of FCNet per entry.
// Output tiles are shared among threads (at::parallel_for); each computes its tile of first-layer
// covariances x1_I x2_J^T / d by one BLAS call (single-threaded inside the parallel region), then runs the
// layer recursion per entry (limits_common.h) and writes both outputs (mirrored in symmetric mode).
// Memory: the outputs, the inputs in double and one T x T tile per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "limits_common.h"
#include "limits_params.h"

namespace ntk_fast {
namespace {

using limits::Params;

int mode_of(const std::string& activation, bool has_table) {
  if (has_table) return limits::kTable;
  if (activation == "relu") return limits::kRelu;
  if (activation == "softplus") return limits::kSoftplus;
  if (activation == "tanh") return limits::kTanh;
  TORCH_CHECK(false, "limit_kernels: activation must be relu, softplus or tanh without a table, got ", activation);
  return -1;
}

void check_f64(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kDouble, "limit_kernels: ", name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "limit_kernels: ", name, " must be on the CPU");
}

template <typename scalar_t>
void run_tiles(const Params& P, const at::Tensor& x1, const at::Tensor& x2, bool symmetric, int64_t T,
               at::Tensor& nngp, at::Tensor& ntk) {
  const int64_t n1 = P.n1, n2 = P.n2, d = x1.size(1);
  const int64_t tb1 = (n1 + T - 1) / T, tb2 = (n2 + T - 1) / T;
  std::vector<std::pair<int32_t, int32_t>> tiles;
  for (int64_t bi = 0; bi < tb1; ++bi)
    for (int64_t bj = symmetric ? bi : 0; bj < tb2; ++bj) tiles.emplace_back((int32_t)bi, (int32_t)bj);
  scalar_t* S = nngp.data_ptr<scalar_t>();
  scalar_t* K = ntk.data_ptr<scalar_t>();
  const double inv_d = 1.0 / (double)d;
  at::parallel_for(0, (int64_t)tiles.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t i0 = (int64_t)tiles[k].first * T, j0 = (int64_t)tiles[k].second * T;
      const int64_t ti = std::min(T, n1 - i0), tj = std::min(T, n2 - j0);
      const at::Tensor g = at::mm(x1.narrow(0, i0, ti), x2.narrow(0, j0, tj).t()).contiguous();
      const double* G = g.data_ptr<double>();
      for (int64_t a = 0; a < ti; ++a) {
        const int64_t i = i0 + a;
        for (int64_t b = 0; b < tj; ++b) {
          const int64_t j = j0 + b;
          if (symmetric && j < i) continue;
          double s, t;
          limits::entry(P, i, j, G[a * tj + b] * inv_d, symmetric && i == j, s, t);
          S[i * n2 + j] = (scalar_t)s;
          K[i * n2 + j] = (scalar_t)t;
          if (symmetric && j != i) {
            S[j * n2 + i] = (scalar_t)s;
            K[j * n2 + i] = (scalar_t)t;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> limit_kernels_cpu(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& q1,
                                                     const at::Tensor& q2, const at::Tensor& table,
                                                     const at::Tensor& nodes, const at::Tensor& weights,
                                                     bool symmetric, int64_t L, c10::string_view activation,
                                                     double beta, double c, double bias, int64_t block) {
  TORCH_CHECK(x1.dim() == 2 && x1.size(0) > 0 && x1.size(1) > 0, "limit_kernels: x1 must be (n1, d), got ",
              x1.sizes());
  TORCH_CHECK(x1.scalar_type() == at::kFloat || x1.scalar_type() == at::kDouble,
              "limit_kernels: x1 must be float32 or float64");
  const at::Tensor& y = symmetric ? x1 : x2;
  TORCH_CHECK(y.dim() == 2 && y.size(1) == x1.size(1) && y.scalar_type() == x1.scalar_type(),
              "limit_kernels: x2 must be (n2, ", x1.size(1), ") of x1's dtype, got ", y.sizes());
  TORCH_CHECK(L >= 1, "limit_kernels: L must be >= 1, got ", L);
  const int64_t n1 = x1.size(0), n2 = y.size(0);
  const at::Tensor& qb = symmetric ? q1 : q2;
  for (auto& pr : {std::make_pair(&q1, "q1"), std::make_pair(&qb, "q2"), std::make_pair(&table, "table"),
                   std::make_pair(&nodes, "nodes"), std::make_pair(&weights, "weights")})
    check_f64(*pr.first, pr.second);
  TORCH_CHECK(q1.dim() == 2 && q1.size(0) == L && q1.size(1) == n1, "limit_kernels: q1 must be (L, n1)");
  TORCH_CHECK(qb.dim() == 2 && qb.size(0) == L && qb.size(1) == n2, "limit_kernels: q2 must be (L, n2)");
  const bool has_table = table.numel() > 0;
  const std::string act(activation.data(), activation.size());
  Params P;
  P.mode = mode_of(act, has_table);
  if (has_table)
    TORCH_CHECK(table.dim() == 3 && table.size(0) == L && table.size(1) == 4 && table.size(2) >= 4,
                "limit_kernels: table must be (L, 4, K + 1) with K >= 3, got ", table.sizes());
  if (P.mode == limits::kSoftplus || P.mode == limits::kTanh)
    TORCH_CHECK(nodes.dim() == 1 && nodes.numel() >= 1 && weights.sizes() == nodes.sizes(),
                "limit_kernels: nodes and weights must be (m,) with m >= 1");
  const at::Tensor x1d = x1.to(at::kDouble).contiguous(), x2d = symmetric ? x1d : y.to(at::kDouble).contiguous();
  const at::Tensor q1c = q1.contiguous(), q2c = qb.contiguous(), tc = table.contiguous();
  const at::Tensor xc = nodes.contiguous(), wc = weights.contiguous();
  P = limits::make_params(P.mode, L, n1, n2, q1c, q2c, tc, xc, wc, beta, c, bias);
  at::Tensor nngp = at::empty({n1, n2}, x1.options());
  at::Tensor ntk = at::empty({n1, n2}, x1.options());
  int64_t T = block > 0 ? block : 64;
  while (T > 8 && ((n1 + T - 1) / T) * ((n2 + T - 1) / T) < 4 * at::get_num_threads()) T /= 2;
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "limit_kernels_cpu",
                             [&] { run_tiles<scalar_t>(P, x1d, x2d, symmetric, T, nngp, ntk); });
  return {nngp, ntk};
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CPU, m) { m.impl("limit_kernels", &limit_kernels_cpu); }

}  // namespace ntk_fast
