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
// the combination.  A factored layer (D[i, c] = s_i o w_c) forms GD from its symmetric k(k+1)/2 part
// (factored_gd): mi mj q (kp + 1) multiply-adds instead of mi mj k^2 q, kp = k(k+1)/2 rounded up to 8.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gram_full_common.h"
#include "../common/cpu_clones.h"

namespace ntk_fast {
namespace {

// acc[(i, c), (j, c')] (+)= s sum_{t, t'} ga[(i, t), (j, t')] gd[(i, c, t), (j, c', t')]   (all row-major,
// dense; `first`: assign instead of add, so the accumulator needs no zeroing).
// T = 1: the row s ga[i, j / k] over the tile's columns v = (j, c') is expanded once into `gexp` (mj k entries)
// and shared by the k rows (i, c), so the inner loop is one contiguous, vectorisable multiply-add.
template <typename S>
NTK_ALWAYS_INLINE void combine_hadamard_t(S* __restrict acc, const S* __restrict ga, const S* __restrict gd,
                                          S* __restrict gexp, int64_t mi, int64_t mj, int64_t k, S s, bool first) {
  const int64_t w = mj * k;
  for (int64_t i = 0; i < mi; ++i) {
    const S* garow = ga + i * mj;
    for (int64_t j = 0; j < mj; ++j)
      for (int64_t c2 = 0; c2 < k; ++c2) gexp[j * k + c2] = s * garow[j];
    for (int64_t u = i * k; u < (i + 1) * k; ++u) {
      S* __restrict arow = acc + u * w;
      const S* __restrict gdrow = gd + u * w;
      if (first) {
        for (int64_t v = 0; v < w; ++v) arow[v] = gexp[v] * gdrow[v];
      } else {
        for (int64_t v = 0; v < w; ++v) arow[v] += gexp[v] * gdrow[v];
      }
    }
  }
}
NTK_CPU_CLONES void combine_hadamard(float* acc, const float* ga, const float* gd, float* gexp, int64_t mi,
                                     int64_t mj, int64_t k, float s, bool first) {
  combine_hadamard_t<float>(acc, ga, gd, gexp, mi, mj, k, s, first);
}
NTK_CPU_CLONES void combine_hadamard(double* acc, const double* ga, const double* gd, double* gexp, int64_t mi,
                                     int64_t mj, int64_t k, double s, bool first) {
  combine_hadamard_t<double>(acc, ga, gd, gexp, mi, mj, k, s, first);
}

// The token-pair form (T > 1): acc[(i, c), (j, c')] += s sum_{t, t'} ga[(i, t), (j, t')] gd[(i, c, t), (j, c', t')].
template <typename S>
void combine_tokens(S* acc, const S* ga, const S* gd, int64_t mi, int64_t mj, int64_t k, int64_t T, S s) {
  const int64_t w = mj * k, lga = mj * T, lgd = mj * k * T;
  for (int64_t u = 0; u < mi * k; ++u) {
    const int64_t i = u / k;
    S* arow = acc + u * w;
    for (int64_t t = 0; t < T; ++t) {
      const S* garow = ga + (i * T + t) * lga;
      const S* gdrow = gd + (u * T + t) * lgd;
      for (int64_t v = 0; v < w; ++v) {
        const S* gav = garow + (v / k) * T;
        const S* gdv = gdrow + v * T;
        S sum = 0;
        for (int64_t t2 = 0; t2 < T; ++t2) sum += gav[t2] * gdv[t2];
        arow[v] += s * sum;
      }
    }
  }
}

// A layer whose D rows are the unit vectors (D[i, c] = e_c, T = 1: a linear readout): D1_ic . D2_jc' = delta_cc',
// so acc[(i, c), (j, c)] += s ga[i, j] and no D product is formed.
template <typename S>
void combine_unit(S* acc, const S* ga, int64_t mi, int64_t mj, int64_t k, S s) {
  const int64_t w = mj * k;
  for (int64_t i = 0; i < mi; ++i)
    for (int64_t c = 0; c < k; ++c) {
      S* arow = acc + (i * k + c) * w + c;
      for (int64_t j = 0; j < mj; ++j) arow[j * k] += s * ga[i * mj + j];
    }
}

// The factored layer's tile product gd[(i, c), (j, c')] = sum_m (s1_i o s2_j)_m w_cm w_c'm, c and c' in [0, k):
// for `ci` rows i at a time, U[(i, j), m] = s1_i,m s2_j,m is formed, R = U Bs^T by BLAS with
// Bs[tri(c, c'), m] = w_cm w_c'm (kp rows, the k(k+1)/2 pairs c <= c' then zeros), and R is expanded by the
// table tri (k x k, symmetric) into gd.  s1 (n1, q), s2 (n2, q), bs (kp, q); ubuf, rbuf thread-local.
struct Factored {
  at::Tensor bs;                 // (kp, q)
  std::vector<int64_t> tri;      // (k, k): the row of Bs holding the pair (min(c, c'), max(c, c'))
};

inline int64_t factored_rows(int64_t k) { return (k * (k + 1) / 2 + 7) / 8 * 8; }   // 56 for k = 10: 55 measured 1.5x slower

Factored make_factored(const at::Tensor& w) {
  const int64_t k = w.size(0), q = w.size(1), kk = k * (k + 1) / 2;
  Factored f{at::zeros({factored_rows(k), q}, w.options()), std::vector<int64_t>(k * k)};
  std::vector<int64_t> first(kk), second(kk);
  int64_t r = 0;
  for (int64_t a = 0; a < k; ++a)
    for (int64_t b = a; b < k; ++b, ++r) {
      first[r] = a, second[r] = b;
      f.tri[a * k + b] = f.tri[b * k + a] = r;
    }
  const auto idx = [&](const std::vector<int64_t>& v) { return at::tensor(v, w.options().dtype(at::kLong)); };
  f.bs.narrow(0, 0, kk).copy_(w.index_select(0, idx(first)) * w.index_select(0, idx(second)));
  return f;
}

// rows of U per BLAS call (k = 10, q = 512, 2-core EPYC: 320, 480 and 640 within noise, the layer ~0.85x dense)
constexpr int64_t kFactoredRows = 320;

inline int64_t factored_points(int64_t B) { return std::max<int64_t>(1, std::min(B, kFactoredRows / B)); }

template <typename S>
void factored_gd(S* __restrict gd, const S* s1, const S* s2, const Factored& f, at::Tensor& ubuf, at::Tensor& rbuf,
                 int64_t i0, int64_t j0, int64_t mi, int64_t mj, int64_t k, int64_t B) {
  const int64_t q = f.bs.size(1), kp = f.bs.size(0), w = mj * k, ci = factored_points(B);
  for (int64_t ia = 0; ia < mi; ia += ci) {
    const int64_t c = std::min(ci, mi - ia);
    S* __restrict u = ubuf.data_ptr<S>();
    for (int64_t il = 0; il < c; ++il) {
      const S* __restrict a = s1 + (i0 + ia + il) * q;
      for (int64_t j = 0; j < mj; ++j) {
        const S* __restrict b = s2 + (j0 + j) * q;
        S* __restrict ur = u + (il * mj + j) * q;
        for (int64_t m = 0; m < q; ++m) ur[m] = a[m] * b[m];
      }
    }
    const int64_t M = c * mj;
    at::Tensor RT = rbuf.narrow(0, 0, kp * M).view({kp, M});      // R^T = Bs U^T (measured faster than U Bs^T)
    at::mm_out(RT, f.bs, ubuf.narrow(0, 0, M * q).view({M, q}).t());
    const S* __restrict r = RT.data_ptr<S>();
    for (int64_t il = 0; il < c; ++il)
      for (int64_t c1 = 0; c1 < k; ++c1) {
        S* __restrict g = gd + ((ia + il) * k + c1) * w;
        const int64_t* t = f.tri.data() + c1 * k;
        for (int64_t j = 0; j < mj; ++j)
          for (int64_t c2 = 0; c2 < k; ++c2) g[j * k + c2] = r[t[c2] * M + il * mj + j];
      }
  }
}

// True when d (n, k, 1, q = k), contiguous, holds d[i, c, 0, :] = e_c for every point (checked exactly).
template <typename S>
bool unit_rows(const at::Tensor& d) {
  const int64_t n = d.size(0), k = d.size(1);
  if (d.size(2) != 1 || d.size(3) != k) return false;
  const S* p = d.data_ptr<S>();
  for (int64_t r = 0; r < n * k; ++r)
    for (int64_t m = 0; m < k; ++m)
      if (p[r * k + m] != (m == r % k ? S(1) : S(0))) return false;
  return true;
}

// store_tile's case of dense (k, k) blocks (out[i, j] rows of k*k contiguous, row stride ld): rows of k copied,
// the mirror block written transposed.
template <typename S>
NTK_ALWAYS_INLINE void store_dense_t(S* optr, int64_t ld, const S* acc, int64_t i0, int64_t j0, int64_t mi,
                                     int64_t mj, int64_t k, bool mirror) {
  const int64_t w = mj * k;
  for (int64_t i = 0; i < mi; ++i) {
    S* __restrict o = optr + (i0 + i) * ld + j0 * k * k;
    for (int64_t j = 0; j < mj; ++j)
      for (int64_t c = 0; c < k; ++c) {
        const S* __restrict a = acc + (i * k + c) * w + j * k;
        for (int64_t c2 = 0; c2 < k; ++c2) o[(j * k + c) * k + c2] = a[c2];
      }
  }
  if (!mirror) return;
  for (int64_t j = 0; j < mj; ++j) {
    S* __restrict m = optr + (j0 + j) * ld + i0 * k * k;
    for (int64_t i = 0; i < mi; ++i)
      for (int64_t c2 = 0; c2 < k; ++c2) {
        const S* __restrict a = acc + i * k * w + j * k + c2;
        for (int64_t c = 0; c < k; ++c) m[(i * k + c2) * k + c] = a[c * w];
      }
  }
}
NTK_CPU_CLONES void store_dense(float* optr, int64_t ld, const float* acc, int64_t i0, int64_t j0, int64_t mi,
                                int64_t mj, int64_t k, bool mirror) {
  store_dense_t<float>(optr, ld, acc, i0, j0, mi, mj, k, mirror);
}
NTK_CPU_CLONES void store_dense(double* optr, int64_t ld, const double* acc, int64_t i0, int64_t j0, int64_t mi,
                                int64_t mj, int64_t k, bool mirror) {
  store_dense_t<double>(optr, ld, acc, i0, j0, mi, mj, k, mirror);
}

// out[i0 + i, j0 + j, c, c'] = acc[(i, c), (j, c')], and the mirror out[j0 + j, i0 + i, c', c] when asked
// (rows of out visited in order in both loops).  A diagonal tile of a symmetric Gram is written from its upper
// half (u <= v) both ways: exactly symmetric.
template <typename scalar_t>
void store_tile(scalar_t* optr, at::IntArrayRef st, const scalar_t* acc, int64_t i0, int64_t j0, int64_t mi,
                int64_t mj, int64_t k, bool mirror, bool diagonal) {
  const int64_t w = mj * k;
  if (!diagonal && st[3] == 1 && st[2] == k && st[1] == k * k) {   // dense (k, k) blocks
    store_dense(optr, st[0], acc, i0, j0, mi, mj, k, mirror);
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
void gram_full_cpu_kernel(const GramFullInputs& in, at::ArrayRef<double> scales, const GramFullShape& s,
                          int64_t block, at::Tensor& out) {
  const std::vector<at::Tensor>&A1 = in.A1, &D1 = in.D1, &A2 = in.A2, &D2 = in.D2;
  const int64_t B = block > 0 ? block : auto_points(s), k = s.k, L = (int64_t)A1.size();
  const auto tiles = gram_full_tiles((s.n1 + B - 1) / B, (s.n2 + B - 1) / B, s.symmetric);
  scalar_t* optr = out.data_ptr<scalar_t>();
  const std::vector<int64_t> st = out.strides().vec();
  const auto opts = A1[0].options();
  // layers with unit D rows (a linear readout) after the others: their tile needs no D product
  std::vector<int64_t> order, unit;
  std::vector<Factored> fac(L);
  int64_t ci = 0, kp = 0, qmax = 0;   // factored layers: points per U block, rows of Bs, widest s
  for (int64_t l = 0; l < L; ++l) {
    if (in.W[l].defined()) {
      fac[l] = make_factored(in.W[l]);
      ci = factored_points(B), kp = factored_rows(k), qmax = std::max(qmax, in.W[l].size(1));
      order.push_back(l);
      continue;
    }
    (unit_rows<scalar_t>(D1[l]) && (s.symmetric || unit_rows<scalar_t>(D2[l])) ? unit : order).push_back(l);
  }
  order.insert(order.end(), unit.begin(), unit.end());
  const int64_t n_full = L - (int64_t)unit.size();
  // a first Hadamard layer with T = 1 assigns the accumulator; otherwise it is zeroed per tile
  const bool assign_first = n_full > 0 && A1[order[0]].size(1) == 1;
  at::parallel_for(0, (int64_t)tiles.size(), 1, [&](int64_t begin, int64_t end) {
    at::Tensor ga = at::empty({B * s.tmax * B * s.tmax}, opts), gd = at::empty({B * k * s.tmax * B * k * s.tmax}, opts);
    at::Tensor acc = at::empty({B * k * B * k}, opts), gexp = at::empty({B * k}, opts);
    at::Tensor ubuf = at::empty({ci * B * qmax}, opts), rbuf = at::empty({ci * B * kp}, opts);
    scalar_t* const pacc = acc.data_ptr<scalar_t>();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = tiles[t].first * B, j0 = tiles[t].second * B;
      const int64_t mi = std::min(B, s.n1 - i0), mj = std::min(B, s.n2 - j0);
      if (!assign_first) acc.narrow(0, 0, mi * k * mj * k).zero_();
      for (int64_t o = 0; o < L; ++o) {
        const int64_t l = order[o], T = A1[l].size(1), p = A1[l].size(2), q = D1[l].size(3);
        const scalar_t sc = (scalar_t)scales[l];
        at::Tensor ga_t = ga.narrow(0, 0, mi * T * mj * T).view({mi * T, mj * T});
        at::mm_out(ga_t, A1[l].view({-1, p}).narrow(0, i0 * T, mi * T), A2[l].view({-1, p}).narrow(0, j0 * T, mj * T).t());
        if (o >= n_full) {
          combine_unit<scalar_t>(pacc, ga_t.data_ptr<scalar_t>(), mi, mj, k, sc);
          continue;
        }
        at::Tensor gd_t = gd.narrow(0, 0, mi * k * T * mj * k * T).view({mi * k * T, mj * k * T});
        if (in.W[l].defined())
          factored_gd<scalar_t>(gd_t.data_ptr<scalar_t>(), D1[l].data_ptr<scalar_t>(), D2[l].data_ptr<scalar_t>(),
                                fac[l], ubuf, rbuf, i0, j0, mi, mj, k, B);
        else
          at::mm_out(gd_t, D1[l].view({-1, q}).narrow(0, i0 * k * T, mi * k * T),
                     D2[l].view({-1, q}).narrow(0, j0 * k * T, mj * k * T).t());
        if (T == 1)
          combine_hadamard(pacc, ga_t.data_ptr<scalar_t>(), gd_t.data_ptr<scalar_t>(), gexp.data_ptr<scalar_t>(), mi,
                           mj, k, sc, assign_first && o == 0);
        else
          combine_tokens<scalar_t>(pacc, ga_t.data_ptr<scalar_t>(), gd_t.data_ptr<scalar_t>(), mi, mj, k, T, sc);
      }
      const bool diagonal = s.symmetric && i0 == j0;
      store_tile<scalar_t>(optr, st, pacc, i0, j0, mi, mj, k, s.symmetric && !diagonal, diagonal);
    }
  });
}

void gram_full_out_cpu(at::TensorList a1, at::TensorList d1, const GFOptList& a2, const GFOptList& d2,
                       at::ArrayRef<double> scales, int64_t block, const GFFactors& w, at::Tensor out) {
  const GramFullShape s = check_gram_full_args(a1, d1, a2, d2, scales, w);
  check_gram_full_out(out, s, a1[0]);
  TORCH_CHECK(block >= 0, "gram_full: block must be >= 0 (0 = automatic), got ", block);
  if (s.n1 == 0 || s.n2 == 0) return;
  GramFullInputs in = gram_full_inputs(a1, d1, a2, d2, s.symmetric, w);
  if (factored_rows(s.k) >= s.k * s.k) materialise_factors(in, s.symmetric);   // small k: the dense form is cheaper
  AT_DISPATCH_FLOATING_TYPES(in.A1[0].scalar_type(), "gram_full_cpu", [&] {
    gram_full_cpu_kernel<scalar_t>(in, scales, s, block, out);
  });
}

at::Tensor gram_full_cpu(at::TensorList a1, at::TensorList d1, const GFOptList& a2, const GFOptList& d2,
                         at::ArrayRef<double> scales, int64_t block, const GFFactors& w) {
  return gram_full_allocating(a1, d1, a2, d2, scales, block, w, gram_full_out_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CPU, m) {
  m.impl("gram_full", &gram_full_cpu);
  m.impl("gram_full.out", &gram_full_out_cpu);
}

}  // namespace ntk_fast
