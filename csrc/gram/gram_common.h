// Shared argument checks for the gram op (CPU and CUDA kernels).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <vector>

namespace ntk_fast {

// The optional right-hand side of the op: a2 = d2 = None means the symmetric Gram of (a1, d1).
using OptList = std::optional<at::TensorList>;

struct GramRight {
  at::TensorList a2, d2;
  bool symmetric;
};

inline GramRight resolve_right(const OptList& a2, const OptList& d2) {
  TORCH_CHECK(a2.has_value() == d2.has_value(), "gram: pass both a2 and d2, or neither (symmetric Gram)");
  if (!a2.has_value()) return {at::TensorList(), at::TensorList(), true};
  return {*a2, *d2, false};
}

struct GramShape {
  int64_t n1, n2;
};

// Checks ranks, matching row counts, matching feature dims, dtypes and devices.
// Returns the output shape.
inline GramShape check_gram_args(const at::TensorList a1, const at::TensorList d1, const at::TensorList a2,
                                 const at::TensorList d2, at::ArrayRef<double> scales, bool symmetric) {
  const auto L = a1.size();
  TORCH_CHECK(L > 0, "gram: a1 must hold at least one layer, got an empty list");
  TORCH_CHECK(d1.size() == L, "gram: d1 must have as many layers as a1 (", L, "), got ", d1.size());
  TORCH_CHECK(scales.size() == L, "gram: scales must have one entry per layer (", L, "), got ", scales.size());
  if (!symmetric) {
    TORCH_CHECK(a2.size() == L && d2.size() == L, "gram: a2 and d2 must have ", L, " layers like a1, got ",
                a2.size(), " and ", d2.size());
  }
  const auto dtype = a1[0].scalar_type();
  const auto device = a1[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "gram: features must be float32 or float64, got ",
              dtype);
  const int64_t n1 = a1[0].size(0);
  const int64_t n2 = symmetric ? n1 : a2[0].size(0);
  auto check = [&](const at::Tensor& t, const char* name, size_t l, int64_t rows) {
    TORCH_CHECK(t.dim() == 2, "gram: ", name, "[", l, "] must be 2-D (points x features), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "gram: ", name, "[", l, "] has dtype ", t.scalar_type(),
                " but a1[0] has ", dtype);
    TORCH_CHECK(t.device() == device, "gram: ", name, "[", l, "] is on ", t.device(), " but a1[0] is on ", device);
    TORCH_CHECK(t.size(0) == rows, "gram: ", name, "[", l, "] has ", t.size(0), " rows, expected ", rows);
  };
  for (size_t l = 0; l < L; ++l) {
    check(a1[l], "a1", l, n1);
    check(d1[l], "d1", l, n1);
    if (!symmetric) {
      check(a2[l], "a2", l, n2);
      check(d2[l], "d2", l, n2);
      TORCH_CHECK(a2[l].size(1) == a1[l].size(1), "gram: a2[", l, "] has ", a2[l].size(1),
                  " features but a1[", l, "] has ", a1[l].size(1));
      TORCH_CHECK(d2[l].size(1) == d1[l].size(1), "gram: d2[", l, "] has ", d2[l].size(1),
                  " features but d1[", l, "] has ", d1[l].size(1));
    }
  }
  return {n1, n2};
}

inline void check_gram_out(const at::Tensor& out, const GramShape& s, const at::Tensor& ref) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == s.n1 && out.size(1) == s.n2, "gram: out must have shape (", s.n1,
              ", ", s.n2, "), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == ref.scalar_type(), "gram: out has dtype ", out.scalar_type(),
              " but the features have ", ref.scalar_type());
}

inline void check_precision(c10::string_view precision) {
  TORCH_CHECK(precision == "highest" || precision == "tf32", "gram: precision must be \"highest\" or \"tf32\", got \"",
              std::string(precision), "\"");
}

}  // namespace ntk_fast
