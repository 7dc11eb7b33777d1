// CPU kernel of ntk_fast::gram: tiles of the output are shared among threads (at::parallel_for);
// each thread computes, per layer, the two tile products A1_I A2_J^T and D1_I D2_J^T (BLAS, one
// thread each) and accumulates their Hadamard product in a thread-local tile, which is then
// written (and, in symmetric mode, mirrored) into `out`.  No per-layer n x n matrix exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gram_common.h"

namespace ntk_fast {
namespace {

int64_t auto_block(int64_t n1, int64_t n2) {
  // 256 keeps the three thread-local tiles (GA, GD, acc) in L2 in float32 and the BLAS calls efficient;
  // small problems use smaller tiles so that both threads get work.
  int64_t b = 256;
  while (b > 32 && (n1 + b - 1) / b * ((n2 + b - 1) / b) < 4 * at::get_num_threads()) b /= 2;
  return b;
}

template <typename scalar_t>
void gram_cpu_kernel(const std::vector<at::Tensor>& a1, const std::vector<at::Tensor>& d1,
                     const std::vector<at::Tensor>& a2, const std::vector<at::Tensor>& d2,
                     at::ArrayRef<double> scales, bool symmetric, int64_t block, at::Tensor& out) {
  const int64_t n1 = a1[0].size(0), n2 = a2[0].size(0);
  const int64_t T = block > 0 ? block : auto_block(n1, n2);
  const int64_t tb1 = (n1 + T - 1) / T, tb2 = (n2 + T - 1) / T;
  // Tile list: all (bi, bj), or bj >= bi in symmetric mode.
  std::vector<std::pair<int32_t, int32_t>> tiles;
  tiles.reserve(symmetric ? tb1 * (tb1 + 1) / 2 : tb1 * tb2);
  for (int64_t bi = 0; bi < tb1; ++bi)
    for (int64_t bj = symmetric ? bi : 0; bj < tb2; ++bj) tiles.emplace_back((int32_t)bi, (int32_t)bj);

  const size_t L = a1.size();
  scalar_t* optr = out.data_ptr<scalar_t>();
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  const auto opts = a1[0].options();

  at::parallel_for(0, (int64_t)tiles.size(), 1, [&](int64_t begin, int64_t end) {
    at::Tensor ga = at::empty({T, T}, opts), gd = at::empty({T, T}, opts), acc = at::empty({T, T}, opts);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (int64_t)tiles[t].first * T, j0 = (int64_t)tiles[t].second * T;
      const int64_t mi = std::min(T, n1 - i0), mj = std::min(T, n2 - j0);
      at::Tensor ga_t = ga.narrow(0, 0, mi).narrow(1, 0, mj);
      at::Tensor gd_t = gd.narrow(0, 0, mi).narrow(1, 0, mj);
      scalar_t* A = acc.data_ptr<scalar_t>();
      for (size_t l = 0; l < L; ++l) {
        at::mm_out(ga_t, a1[l].narrow(0, i0, mi), a2[l].narrow(0, j0, mj).t());
        at::mm_out(gd_t, d1[l].narrow(0, i0, mi), d2[l].narrow(0, j0, mj).t());
        const scalar_t s = (scalar_t)scales[l];
        const scalar_t* G = ga.data_ptr<scalar_t>();
        const scalar_t* D = gd.data_ptr<scalar_t>();
        // ga_t/gd_t are views with row stride T.
        if (l == 0) {
          for (int64_t r = 0; r < mi; ++r) {
            scalar_t* ar = A + r * T;
            const scalar_t* gr = G + r * T;
            const scalar_t* dr = D + r * T;
            for (int64_t c = 0; c < mj; ++c) ar[c] = s * gr[c] * dr[c];
          }
        } else {
          for (int64_t r = 0; r < mi; ++r) {
            scalar_t* ar = A + r * T;
            const scalar_t* gr = G + r * T;
            const scalar_t* dr = D + r * T;
            for (int64_t c = 0; c < mj; ++c) ar[c] += s * gr[c] * dr[c];
          }
        }
      }
      if (symmetric && i0 == j0) {
        // diagonal tile: keep its upper triangle and mirror it, so that out is exactly symmetric
        for (int64_t r = 0; r < mi; ++r)
          for (int64_t c = r; c < mj; ++c) {
            optr[(i0 + r) * os0 + (j0 + c) * os1] = A[r * T + c];
            optr[(i0 + c) * os0 + (j0 + r) * os1] = A[r * T + c];
          }
        continue;
      }
      for (int64_t r = 0; r < mi; ++r) {
        scalar_t* orow = optr + (i0 + r) * os0 + j0 * os1;
        const scalar_t* ar = A + r * T;
        for (int64_t c = 0; c < mj; ++c) orow[c * os1] = ar[c];
      }
      if (symmetric) {
        for (int64_t c = 0; c < mj; ++c) {
          scalar_t* orow = optr + (j0 + c) * os0 + i0 * os1;
          for (int64_t r = 0; r < mi; ++r) orow[r * os1] = A[r * T + c];
        }
      }
    }
  });
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> v;
  v.reserve(ts.size());
  for (const auto& t : ts) v.push_back(t.contiguous());
  return v;
}

void gram_out_cpu(at::TensorList a1, at::TensorList d1, const OptList& a2_, const OptList& d2_,
                   at::ArrayRef<double> scales, int64_t block, c10::string_view precision,
                  at::Tensor out) {
  const GramRight right = resolve_right(a2_, d2_);
  const at::TensorList a2 = right.a2, d2 = right.d2;
  const bool symmetric = right.symmetric;
  check_precision(precision);
  const GramShape s = check_gram_args(a1, d1, a2, d2, scales, symmetric);
  check_gram_out(out, s, a1[0]);
  TORCH_CHECK(out.device().is_cpu(), "gram: out must be a CPU tensor for CPU features, got ", out.device());
  TORCH_CHECK(block >= 0, "gram: block must be >= 0 (0 = automatic), got ", block);
  if (s.n1 == 0 || s.n2 == 0) return;
  auto A1 = contiguous_all(a1), D1 = contiguous_all(d1);
  auto A2 = symmetric ? A1 : contiguous_all(a2);
  auto D2 = symmetric ? D1 : contiguous_all(d2);
  AT_DISPATCH_FLOATING_TYPES(A1[0].scalar_type(), "gram_cpu", [&] {
    gram_cpu_kernel<scalar_t>(A1, D1, A2, D2, scales, symmetric, block, out);
  });
}

at::Tensor gram_cpu(at::TensorList a1, at::TensorList d1, const OptList& a2_, const OptList& d2_,
                     at::ArrayRef<double> scales, int64_t block, c10::string_view precision) {
  const GramRight right = resolve_right(a2_, d2_);
  const at::TensorList a2 = right.a2, d2 = right.d2;
  const bool symmetric = right.symmetric;
  const GramShape s = check_gram_args(a1, d1, a2, d2, scales, symmetric);
  at::Tensor out = at::empty({s.n1, s.n2}, a1[0].options());
  gram_out_cpu(a1, d1, a2_, d2_, scales, block, precision, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("gram.out", &gram_out_cpu);
}

}  // namespace ntk_fast
