// CPU kernel of ntk_fast::gram_full (maths in gram_full_common.h).
//
// Tiles of points (bi, bj) are shared among threads (at::parallel_for).  Per tile and layer a thread forms
// the two tile products with BLAS (one thread each):
//   GA = A1_I A2_J^T   ((mi T) x (mj T): rows (point, token)),
//   GD = D1_I D2_J^T   ((mi k T) x (mj k T): rows (point, output, token)),
// and adds  s_l sum_{t, t'} GA[(i, t), (j, t')] GD[(i, c, t), (j, c', t')]  to a thread-local accumulator
// acc[(i, c), (j, c')] that stays in cache.  The finished tile is written once into out[i, j, c, c'] (and, in
// symmetric mode, into its mirror out[j, i, c', c]); no n x n matrix per layer and no second pass over out.
// Cost per tile: mi mj sum_l T_l^2 (p_l + k^2 q_l) multiply-adds for the products, mi mj k^2 sum_l T_l^2 for
// the combination.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gram_full_common.h"

namespace ntk_fast {
namespace {

// acc[(i, c), (j, c')] += s sum_{t, t'} ga[(i, t), (j, t')] gd[(i, c, t), (j, c', t')]   (all row-major, dense).
// T = 1: the row s ga[i, j / k] over the tile's columns v = (j, c') is expanded once into `gexp` (mj k entries)
// and shared by the k rows (i, c), so the inner loop is one contiguous, vectorisable multiply-add.
template <typename scalar_t>
void combine_tile(scalar_t* __restrict acc, const scalar_t* __restrict ga, const scalar_t* __restrict gd,
                  scalar_t* __restrict gexp, int64_t mi, int64_t mj, int64_t k, int64_t T, scalar_t s) {
  const int64_t w = mj * k, lga = mj * T, lgd = mj * k * T;
  if (T == 1) {
    for (int64_t i = 0; i < mi; ++i) {
      const scalar_t* garow = ga + i * lga;
      for (int64_t j = 0; j < mj; ++j)
        for (int64_t c2 = 0; c2 < k; ++c2) gexp[j * k + c2] = s * garow[j];
      for (int64_t u = i * k; u < (i + 1) * k; ++u) {
        scalar_t* __restrict arow = acc + u * w;
        const scalar_t* __restrict gdrow = gd + u * lgd;
        for (int64_t v = 0; v < w; ++v) arow[v] += gexp[v] * gdrow[v];
      }
    }
    return;
  }
  for (int64_t u = 0; u < mi * k; ++u) {
    const int64_t i = u / k;
    scalar_t* arow = acc + u * w;
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* garow = ga + (i * T + t) * lga;
      const scalar_t* gdrow = gd + (u * T + t) * lgd;
      for (int64_t v = 0; v < w; ++v) {
        const scalar_t* gav = garow + (v / k) * T;
        const scalar_t* gdv = gdrow + v * T;
        scalar_t sum = 0;
        for (int64_t t2 = 0; t2 < T; ++t2) sum += gav[t2] * gdv[t2];
        arow[v] += s * sum;
      }
    }
  }
}

// out[i0 + i, j0 + j, c, c'] = acc[(i, c), (j, c')], and the mirror out[j0 + j, i0 + i, c', c] when asked
// (rows of out visited in order in both loops).  A diagonal tile of a symmetric Gram is written from its upper
// half (u <= v) both ways: exactly symmetric.
template <typename scalar_t>
void store_tile(scalar_t* optr, at::IntArrayRef st, const scalar_t* acc, int64_t i0, int64_t j0, int64_t mi,
                int64_t mj, int64_t k, bool mirror, bool diagonal) {
  const int64_t w = mj * k;
  if (!diagonal && st[3] == 1 && st[2] == k && st[1] == k * k) {   // dense (k, k) blocks: rows of k copied
    for (int64_t i = 0; i < mi; ++i) {
      scalar_t* __restrict o = optr + (i0 + i) * st[0] + j0 * k * k;
      for (int64_t j = 0; j < mj; ++j)
        for (int64_t c = 0; c < k; ++c) {
          const scalar_t* __restrict a = acc + (i * k + c) * w + j * k;
          for (int64_t c2 = 0; c2 < k; ++c2) o[(j * k + c) * k + c2] = a[c2];
        }
    }
    if (!mirror) return;
    for (int64_t j = 0; j < mj; ++j) {
      scalar_t* __restrict m = optr + (j0 + j) * st[0] + i0 * k * k;
      for (int64_t i = 0; i < mi; ++i)
        for (int64_t c = 0; c < k; ++c) {
          const scalar_t* __restrict a = acc + (i * k + c) * w + j * k;
          for (int64_t c2 = 0; c2 < k; ++c2) m[(i * k + c2) * k + c] = a[c2];
        }
    }
    return;
  }
  for (int64_t i = 0; i < mi; ++i)
    for (int64_t j = 0; j < mj; ++j) {
      scalar_t* o = optr + (i0 + i) * st[0] + (j0 + j) * st[1];
      for (int64_t c = 0; c < k; ++c)
        for (int64_t c2 = 0; c2 < k; ++c2) {
          const int64_t u = i * k + c, v = j * k + c2;
          if (!diagonal || u <= v) o[c * st[2] + c2 * st[3]] = acc[u * w + v];
        }
    }
  if (!mirror && !diagonal) return;
  for (int64_t j = 0; j < mj; ++j)
    for (int64_t i = 0; i < mi; ++i) {
      scalar_t* m = optr + (j0 + j) * st[0] + (i0 + i) * st[1];
      for (int64_t c2 = 0; c2 < k; ++c2)
        for (int64_t c = 0; c < k; ++c) {
          const int64_t u = i * k + c, v = j * k + c2;
          if (!diagonal || u < v) m[c2 * st[2] + c * st[3]] = acc[u * w + v];
        }
    }
}

int64_t auto_points(const GramFullShape& s) {
  // about 400 rows of the D tile (measured on a 2-core EPYC, k = 10, q = 512: 400 rows 10% faster than 256 or
  // 510); GD and the accumulator (0.6 MB each in float32) stay in L2/L3; enough tiles for the threads
  int64_t b = gram_full_points_per_tile(s.k, s.tmax, 400);
  const int64_t want = 4 * at::get_num_threads();
  while (b > 1 && ((s.n1 + b - 1) / b) * ((s.n2 + b - 1) / b) < want) b = (b + 1) / 2;
  return b;
}

template <typename scalar_t>
void gram_full_cpu_kernel(const std::vector<at::Tensor>& A1, const std::vector<at::Tensor>& D1,
                          const std::vector<at::Tensor>& A2, const std::vector<at::Tensor>& D2,
                          at::ArrayRef<double> scales, const GramFullShape& s, int64_t block, at::Tensor& out) {
  const int64_t B = block > 0 ? block : auto_points(s), k = s.k, L = (int64_t)A1.size();
  const auto tiles = gram_full_tiles((s.n1 + B - 1) / B, (s.n2 + B - 1) / B, s.symmetric);
  scalar_t* optr = out.data_ptr<scalar_t>();
  const std::vector<int64_t> st = out.strides().vec();
  const auto opts = A1[0].options();
  at::parallel_for(0, (int64_t)tiles.size(), 1, [&](int64_t begin, int64_t end) {
    at::Tensor ga = at::empty({B * s.tmax * B * s.tmax}, opts), gd = at::empty({B * k * s.tmax * B * k * s.tmax}, opts);
    at::Tensor acc = at::empty({B * k * B * k}, opts), gexp = at::empty({B * k}, opts);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = tiles[t].first * B, j0 = tiles[t].second * B;
      const int64_t mi = std::min(B, s.n1 - i0), mj = std::min(B, s.n2 - j0);
      acc.zero_();
      for (int64_t l = 0; l < L; ++l) {
        const int64_t T = A1[l].size(1), p = A1[l].size(2), q = D1[l].size(3);
        at::Tensor ga_t = ga.narrow(0, 0, mi * T * mj * T).view({mi * T, mj * T});
        at::Tensor gd_t = gd.narrow(0, 0, mi * k * T * mj * k * T).view({mi * k * T, mj * k * T});
        at::mm_out(ga_t, A1[l].view({-1, p}).narrow(0, i0 * T, mi * T), A2[l].view({-1, p}).narrow(0, j0 * T, mj * T).t());
        at::mm_out(gd_t, D1[l].view({-1, q}).narrow(0, i0 * k * T, mi * k * T),
                   D2[l].view({-1, q}).narrow(0, j0 * k * T, mj * k * T).t());
        combine_tile<scalar_t>(acc.data_ptr<scalar_t>(), ga_t.data_ptr<scalar_t>(), gd_t.data_ptr<scalar_t>(),
                               gexp.data_ptr<scalar_t>(), mi, mj, k, T, (scalar_t)scales[l]);
      }
      const bool diagonal = s.symmetric && i0 == j0;
      store_tile<scalar_t>(optr, st, acc.data_ptr<scalar_t>(), i0, j0, mi, mj, k, s.symmetric && !diagonal, diagonal);
    }
  });
}

void gram_full_out_cpu(at::TensorList a1, at::TensorList d1, const GFOptList& a2, const GFOptList& d2,
                       at::ArrayRef<double> scales, int64_t block, at::Tensor out) {
  const GramFullShape s = check_gram_full_args(a1, d1, a2, d2, scales);
  check_gram_full_out(out, s, a1[0]);
  TORCH_CHECK(block >= 0, "gram_full: block must be >= 0 (0 = automatic), got ", block);
  if (s.n1 == 0 || s.n2 == 0) return;
  const GramFullInputs in = gram_full_inputs(a1, d1, a2, d2, s.symmetric);
  AT_DISPATCH_FLOATING_TYPES(in.A1[0].scalar_type(), "gram_full_cpu", [&] {
    gram_full_cpu_kernel<scalar_t>(in.A1, in.D1, in.A2, in.D2, scales, s, block, out);
  });
}

at::Tensor gram_full_cpu(at::TensorList a1, at::TensorList d1, const GFOptList& a2, const GFOptList& d2,
                         at::ArrayRef<double> scales, int64_t block) {
  return gram_full_allocating(a1, d1, a2, d2, scales, block, gram_full_out_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CPU, m) {
  m.impl("gram_full", &gram_full_cpu);
  m.impl("gram_full.out", &gram_full_out_cpu);
}

}  // namespace ntk_fast
