// ntk_fast::gram_full: argument checks and tile geometry shared by the CPU and CUDA kernels.
//
//   out[i, j, c, c'] = sum_l s_l sum_{t, t'} (A1_l[i, t] . A2_l[j, t']) (D1_l[i, c, t] . D2_l[j, c', t'])
//
// a[l] (n, T_l, p_l): layer inputs per token; d[l] (n, k, T_l, q_l): back-propagated signals per output and
// token; out (n1, n2, k, k).  T_l = 1 is the Hadamard identity with the A products shared by all k x k
// output pairs; T_l > 1 the token-pair form; a = ones (n, 1, 1) with d = per-sample gradients (n, k, 1, P)
// gives the Gram of materialised gradients.
//
// Factored layers (w[l] defined, (k, q_l)): d[l] (n, 1, 1, q_l) holds s and D[i, c] = s_i o w_c, as for the layer
// below a linear readout (s the activation slopes, w_c the readout's row c).  Then
//   D1_ic . D2_jc' = sum_m (s1_i o s2_j)_m w_cm w_c'm,
// symmetric in (c, c'): k(k+1)/2 products of length q per point pair instead of k^2.
#include <ATen/ATen.h>
#include <algorithm>
#include <optional>
#include <vector>

namespace ntk_fast {

using GFOptList = std::optional<at::TensorList>;
using GFFactors = std::optional<c10::List<std::optional<at::Tensor>>>;

// w[l], or an undefined tensor when layer l is dense (w None, or its entry None).
inline at::Tensor factor_of(const GFFactors& w, size_t l) {
  if (!w.has_value() || l >= w->size()) return at::Tensor();
  const std::optional<at::Tensor> t = w->get(l);
  return t.has_value() ? *t : at::Tensor();
}

struct GramFullShape {
  int64_t n1, n2, k, tmax;
  bool symmetric;
};

inline GramFullShape check_gram_full_args(at::TensorList a1, at::TensorList d1, const GFOptList& a2_,
                                          const GFOptList& d2_, at::ArrayRef<double> scales, const GFFactors& w) {
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
  TORCH_CHECK(!w.has_value() || w->size() == L, "gram_full: w must be None or hold one entry per layer (", L,
              "), got ", w.has_value() ? w->size() : 0);
  const at::Tensor w0 = factor_of(w, 0);
  TORCH_CHECK(!w0.defined() || w0.dim() == 2, "gram_full: w[0] must be 2-D (outputs, features), got shape ",
              w0.sizes());
  const int64_t n1 = a1[0].size(0), n2 = a2[0].size(0), k = w0.defined() ? w0.size(0) : d1[0].size(1);
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
    const at::Tensor wl = factor_of(w, l);
    if (wl.defined()) {
      TORCH_CHECK(wl.dim() == 2 && wl.size(0) == k && wl.size(1) == d1[l].size(3), "gram_full: w[", l,
                  "] must have shape (", k, ", ", d1[l].size(3), "), got ", wl.sizes());
      TORCH_CHECK(wl.scalar_type() == dtype && wl.device() == device, "gram_full: w[", l, "] is ", wl.scalar_type(),
                  " on ", wl.device(), " but a1[0] is ", dtype, " on ", device);
      TORCH_CHECK(T == 1 && d1[l].size(1) == 1 && d2[l].size(1) == 1, "gram_full: the factored layer ", l,
                  " needs d1 and d2 of shape (n, 1, 1, q) and one token, got ", d1[l].sizes(), " and ",
                  d2[l].sizes());
    } else {
      TORCH_CHECK(d1[l].size(1) == k && d2[l].size(1) == k, "gram_full: d1[", l, "] and d2[", l, "] must have ",
                  k, " outputs like d1[0], got ", d1[l].size(1), " and ", d2[l].size(1));
    }
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

// The features made contiguous once; in symmetric mode the right-hand side is the left one.  W[l]: the factor of
// layer l, undefined for a dense layer.
struct GramFullInputs {
  std::vector<at::Tensor> A1, D1, A2, D2, W;
};

inline GramFullInputs gram_full_inputs(at::TensorList a1, at::TensorList d1, const GFOptList& a2,
                                       const GFOptList& d2, bool symmetric, const GFFactors& w) {
  auto contiguous = [](at::TensorList ts) {
    std::vector<at::Tensor> v;
    v.reserve(ts.size());
    for (const auto& t : ts) v.push_back(t.contiguous());
    return v;
  };
  GramFullInputs in{contiguous(a1), contiguous(d1), {}, {}};
  in.A2 = symmetric ? in.A1 : contiguous(*a2);
  in.D2 = symmetric ? in.D1 : contiguous(*d2);
  for (size_t l = 0; l < in.A1.size(); ++l) {
    const at::Tensor wl = factor_of(w, l);
    in.W.push_back(wl.defined() ? wl.contiguous() : wl);
  }
  return in;
}

// Factored layers made dense, D[i, c, 0] = s_i o w_c (n, k, 1, q): for kernels without the factored form.
inline void materialise_factors(GramFullInputs& in, bool symmetric) {
  for (size_t l = 0; l < in.W.size(); ++l) {
    if (!in.W[l].defined()) continue;
    const at::Tensor w = in.W[l].unsqueeze(0).unsqueeze(2);   // (1, k, 1, q)
    in.D1[l] = (in.D1[l] * w).contiguous();
    in.D2[l] = symmetric ? in.D1[l] : (in.D2[l] * w).contiguous();
    in.W[l] = at::Tensor();
  }
}

// The allocating overload of either device: out (n1, n2, k, k) like a1[0], filled by the .out kernel `fill`.
template <typename Fill>
at::Tensor gram_full_allocating(at::TensorList a1, at::TensorList d1, const GFOptList& a2, const GFOptList& d2,
                                at::ArrayRef<double> scales, int64_t block, const GFFactors& w, Fill fill) {
  const GramFullShape s = check_gram_full_args(a1, d1, a2, d2, scales, w);
  at::Tensor out = at::empty({s.n1, s.n2, s.k, s.k}, a1[0].options());
  fill(a1, d1, a2, d2, scales, block, w, out);
  return out;
}

}  // namespace ntk_fast
