// ntk_fast::gram_full: argument checks and tile geometry shared by the CPU and CUDA kernels.
//
//   out[i, j, c, c'] = sum_l s_l sum_{t, t'} (A1_l[i, t] . A2_l[j, t']) (D1_l[i, c, t] . D2_l[j, c', t'])
//
// a[l] (n, T_l, p_l): layer inputs per token; d[l] (n, k, T_l, q_l): back-propagated signals per output and
// token; out (n1, n2, k, k).  T_l = 1 is the Hadamard identity with the A products shared by all k x k
// output pairs; T_l > 1 the token-pair form; a = ones (n, 1, 1) with d = per-sample gradients (n, k, 1, P)
// gives the Gram of materialised gradients.
#pragma once
#include <ATen/ATen.h>
#include <algorithm>
#include <optional>
#include <vector>

namespace ntk_fast {

using GFOptList = std::optional<at::TensorList>;

struct GramFullShape {
  int64_t n1, n2, k, tmax;
  bool symmetric;
};

inline GramFullShape check_gram_full_args(at::TensorList a1, at::TensorList d1, const GFOptList& a2_,
                                          const GFOptList& d2_, at::ArrayRef<double> scales) {
  TORCH_CHECK(a2_.has_value() == d2_.has_value(), "gram_full: pass both a2 and d2, or neither (symmetric Gram)");
  const bool sym = !a2_.has_value();
  const auto L = a1.size();
  TORCH_CHECK(L > 0, "gram_full: a1 must hold at least one layer, got an empty list");
  TORCH_CHECK(d1.size() == L, "gram_full: d1 must have as many layers as a1 (", L, "), got ", d1.size());
  TORCH_CHECK(scales.size() == L, "gram_full: scales must have one entry per layer (", L, "), got ", scales.size());
  at::TensorList a2 = sym ? a1 : *a2_, d2 = sym ? d1 : *d2_;
  TORCH_CHECK(a2.size() == L && d2.size() == L, "gram_full: a2 and d2 must have ", L, " layers like a1, got ",
              a2.size(), " and ", d2.size());
  const auto dtype = a1[0].scalar_type();
  const auto device = a1[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "gram_full: features must be float32 or float64, got ",
              dtype);
  TORCH_CHECK(d1[0].dim() == 4, "gram_full: d1[0] must be 4-D (points, outputs, tokens, features), got shape ",
              d1[0].sizes());
  const int64_t n1 = a1[0].size(0), n2 = a2[0].size(0), k = d1[0].size(1);
  int64_t tmax = 1;
  auto same = [&](const at::Tensor& t, const char* name, size_t l, int64_t dim, int64_t rows) {
    TORCH_CHECK(t.dim() == dim, "gram_full: ", name, "[", l, "] must be ", dim, "-D, got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "gram_full: ", name, "[", l, "] has dtype ", t.scalar_type(),
                " but a1[0] has ", dtype);
    TORCH_CHECK(t.device() == device, "gram_full: ", name, "[", l, "] is on ", t.device(), " but a1[0] is on ",
                device);
    TORCH_CHECK(t.size(0) == rows, "gram_full: ", name, "[", l, "] has ", t.size(0), " rows, expected ", rows);
  };
  for (size_t l = 0; l < L; ++l) {
    same(a1[l], "a1", l, 3, n1);
    same(d1[l], "d1", l, 4, n1);
    same(a2[l], "a2", l, 3, n2);
    same(d2[l], "d2", l, 4, n2);
    const int64_t T = a1[l].size(1);
    TORCH_CHECK(T >= 1, "gram_full: a1[", l, "] has no tokens");
    TORCH_CHECK(d1[l].size(1) == k && d2[l].size(1) == k, "gram_full: d1[", l, "] and d2[", l, "] must have ", k,
                " outputs like d1[0], got ", d1[l].size(1), " and ", d2[l].size(1));
    TORCH_CHECK(a2[l].size(1) == T && d1[l].size(2) == T && d2[l].size(2) == T, "gram_full: layer ", l,
                " has ", T, " tokens in a1 but a2, d1, d2 have ", a2[l].size(1), ", ", d1[l].size(2), ", ",
                d2[l].size(2));
    TORCH_CHECK(a2[l].size(2) == a1[l].size(2), "gram_full: a2[", l, "] has ", a2[l].size(2),
                " features but a1[", l, "] has ", a1[l].size(2));
    TORCH_CHECK(d2[l].size(3) == d1[l].size(3), "gram_full: d2[", l, "] has ", d2[l].size(3),
                " features but d1[", l, "] has ", d1[l].size(3));
    tmax = std::max(tmax, T);
  }
  TORCH_CHECK(k >= 1, "gram_full: d1[0] has no outputs");
  return {n1, n2, k, tmax, sym};
}

inline void check_gram_full_out(const at::Tensor& out, const GramFullShape& s, const at::Tensor& ref) {
  TORCH_CHECK(out.dim() == 4 && out.size(0) == s.n1 && out.size(1) == s.n2 && out.size(2) == s.k &&
                  out.size(3) == s.k,
              "gram_full: out must have shape (", s.n1, ", ", s.n2, ", ", s.k, ", ", s.k, "), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == ref.scalar_type(), "gram_full: out has dtype ", out.scalar_type(),
              " but the features have ", ref.scalar_type());
  TORCH_CHECK(out.device() == ref.device(), "gram_full: out is on ", out.device(), " but the features are on ",
              ref.device());
}

// Points per tile: about `rows` rows of the widest D tile (points x outputs x tokens), at least one point.
inline int64_t gram_full_points_per_tile(int64_t k, int64_t tmax, int64_t rows) {
  return std::max<int64_t>(1, rows / (k * tmax));
}

// The tile list: all (bi, bj), or bj >= bi in symmetric mode.
inline std::vector<std::pair<int64_t, int64_t>> gram_full_tiles(int64_t tb1, int64_t tb2, bool symmetric) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  tiles.reserve(symmetric ? tb1 * (tb1 + 1) / 2 : tb1 * tb2);
  for (int64_t bi = 0; bi < tb1; ++bi)
    for (int64_t bj = symmetric ? bi : 0; bj < tb2; ++bj) tiles.emplace_back(bi, bj);
  return tiles;
}

// The features made contiguous once; in symmetric mode the right-hand side is the left one.
struct GramFullInputs {
  std::vector<at::Tensor> A1, D1, A2, D2;
};

inline GramFullInputs gram_full_inputs(at::TensorList a1, at::TensorList d1, const GFOptList& a2,
                                       const GFOptList& d2, bool symmetric) {
  auto contiguous = [](at::TensorList ts) {
    std::vector<at::Tensor> v;
    v.reserve(ts.size());
    for (const auto& t : ts) v.push_back(t.contiguous());
    return v;
  };
  GramFullInputs in{contiguous(a1), contiguous(d1), {}, {}};
  in.A2 = symmetric ? in.A1 : contiguous(*a2);
  in.D2 = symmetric ? in.D1 : contiguous(*d2);
  return in;
}

// The allocating overload of either device: out (n1, n2, k, k) like a1[0], filled by the .out kernel `fill`.
template <typename Fill>
at::Tensor gram_full_allocating(at::TensorList a1, at::TensorList d1, const GFOptList& a2, const GFOptList& d2,
                                at::ArrayRef<double> scales, int64_t block, Fill fill) {
  const GramFullShape s = check_gram_full_args(a1, d1, a2, d2, scales);
  at::Tensor out = at::empty({s.n1, s.n2, s.k, s.k}, a1[0].options());
  fill(a1, d1, a2, d2, scales, block, out);
  return out;
}

}  // namespace ntk_fast
