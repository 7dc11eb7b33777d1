// CPU kernel of ntk_fast::kernel_flow_step: one attempt of the frozen-kernel flow for E problems.
//
// Per active problem e (rows of the (E, n) state tensors; inv_n = 1 / n):
//   f'  = f - dt g                     (trial outputs)
//   u'  = y o f',  r' = l'(u') o y      (loss derivative in output space)
//   c'  = c + dt r inv_n               (c(t) = int (1/n) l'(y o F) o y dt; F = -Theta c)
//   g'  = Theta r' inv_n               (the only O(n^2) work: one read of the upper triangle of Theta)
//   stats = [|g|^2, |g'|^2, |g - g'|^2, dt max|g|, min u', mean l(u'), max|g'|]   (float64)
// Inactive problems are copied through unchanged with zero stats.
//
// The symmetric product reads only the tiles (I, J), I <= J, of Theta (full storage or tile-packed): an
// off-diagonal tile contributes Theta_IJ r_J to g_I and Theta_IJ^T r_I to g_J while it is in cache.  Threads
// take contiguous runs of tiles and accumulate into private (ne x n) buffers that are summed at the end.
// With one Theta shared by ne >= 2 active problems the right-hand sides are gathered problem-major and each
// 4-row strip of a tile is swept (from L1) once per pair of problems, vectorised over points (tile_pm), so
// Theta is streamed from memory once per attempt and each element serves 2 ne multiply-adds.
// Cost per attempt: n^2/2 Theta reads (E times that for E kernels), 2 E n^2 flops, O(threads E n) extra.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernel_flow_common.h"
#include "../common/cpu_clones.h"

namespace ntk_fast {
namespace {

template <typename S>
struct TileJob {
  const S* theta;       // full (n x n, row stride n) or packed (tiles of T x T)
  bool packed;
  int64_t n, T, nt;
  const S* R;           // right-hand sides, ne x n (problem e at R + e n)
  int ne;               // number of right-hand sides
  const std::pair<int32_t, int32_t>* tiles;
};

// One tile, one right-hand side: rows i of th (row stride ld), columns j.
template <typename S>
NTK_ALWAYS_INLINE void tile_1(const S* th, int64_t ld, int64_t mi, int64_t mj, bool diag, const S* RI,
                              const S* RJ, S* YI, S* YJ) {
  if (diag) {  // upper triangle of the diagonal tile only: element (i, j > i) serves rows i and j
    for (int64_t i = 0; i < mi; ++i) {
      const S* t = th + i * ld;
      const S ri = RI[i];
      S acc = t[i] * ri;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = i + 1; j < mj; ++j) {
        acc += t[j] * RJ[j];
        YJ[j] += t[j] * ri;
      }
      YI[i] += acc;
    }
    return;
  }
  // Four rows at a time: a quarter of the loads/stores of YJ, four independent Theta streams (measured here:
  // 4 rows stream at ~38 GB/s on one core, 2 rows at ~22 GB/s, 1 row at ~34 GB/s).
  int64_t i = 0;
  for (; i + 4 <= mi; i += 4) {
    const S* t0 = th + i * ld;
    const S* t1 = t0 + ld;
    const S* t2 = t1 + ld;
    const S* t3 = t2 + ld;
    const S r0 = RI[i], r1 = RI[i + 1], r2 = RI[i + 2], r3 = RI[i + 3];
    S a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t j = 0; j < mj; ++j) {
      const S rj = RJ[j];
      a0 += t0[j] * rj;
      a1 += t1[j] * rj;
      a2 += t2[j] * rj;
      a3 += t3[j] * rj;
      YJ[j] += (t0[j] * r0 + t1[j] * r1) + (t2[j] * r2 + t3[j] * r3);
    }
    YI[i] += a0;
    YI[i + 1] += a1;
    YI[i + 2] += a2;
    YI[i + 3] += a3;
  }
  for (; i < mi; ++i) {
    const S* t = th + i * ld;
    const S ri = RI[i];
    S acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < mj; ++j) {
      acc += t[j] * RJ[j];
      YJ[j] += t[j] * ri;
    }
    YI[i] += acc;
  }
}

// 4 rows (t0, t0 + ld, ..) x 2 problems of an off-diagonal tile: A[k] += sum_j t_k[j] ra[j], ya[j] += sum_k t_k[j] P[k]
// (B, yb, Q, rb likewise).  Kept out of line (with its own CPU clones) so that the register allocator sees only
// this loop: inlined into the tile loop nest, GCC spilled a Theta row to the stack.
template <typename S>
NTK_ALWAYS_INLINE void strip_pair_t(const S* __restrict t0, int64_t ld, int64_t mj, const S* __restrict ra,
                                    const S* __restrict rb, S* __restrict ya, S* __restrict yb, const S* P,
                                    const S* Q, S* A, S* B) {
  const S* __restrict t1 = t0 + ld;
  const S* __restrict t2 = t1 + ld;
  const S* __restrict t3 = t2 + ld;
  const S p0 = P[0], p1 = P[1], p2 = P[2], p3 = P[3];
  const S q0 = Q[0], q1 = Q[1], q2 = Q[2], q3 = Q[3];
  S a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t j = 0; j < mj; ++j) {
    const S s0 = t0[j], s1 = t1[j], s2 = t2[j], s3 = t3[j];
    const S x = ra[j], z = rb[j];
    a0 += s0 * x;
    a1 += s1 * x;
    a2 += s2 * x;
    a3 += s3 * x;
    b0 += s0 * z;
    b1 += s1 * z;
    b2 += s2 * z;
    b3 += s3 * z;
    ya[j] += (s0 * p0 + s1 * p1) + (s2 * p2 + s3 * p3);
    yb[j] += (s0 * q0 + s1 * q1) + (s2 * q2 + s3 * q3);
  }
  A[0] += a0;
  A[1] += a1;
  A[2] += a2;
  A[3] += a3;
  B[0] += b0;
  B[1] += b1;
  B[2] += b2;
  B[3] += b3;
}

__attribute__((noinline)) NTK_CPU_CLONES void strip_pair(const double* t0, int64_t ld, int64_t mj, const double* ra,
                                                      const double* rb, double* ya, double* yb, const double* P,
                                                      const double* Q, double* A, double* B) {
  strip_pair_t<double>(t0, ld, mj, ra, rb, ya, yb, P, Q, A, B);
}
__attribute__((noinline)) NTK_CPU_CLONES void strip_pair(const float* t0, int64_t ld, int64_t mj, const float* ra,
                                                      const float* rb, float* ya, float* yb, const float* P,
                                                      const float* Q, float* A, float* B) {
  strip_pair_t<float>(t0, ld, mj, ra, rb, ya, yb, P, Q, A, B);
}

// One tile, ne right-hand sides stored problem-major (problem e at R + e ldr, its accumulator at Y + e ldr),
// vectorised over points: each 4-row strip of the tile (4 T elements, L1-resident) is swept once per pair of
// problems, so Theta is streamed from memory once and every element loaded from L1 serves 4 multiply-adds.
// Per problem the arithmetic is that of tile_1 (same expressions, same order).  (A left-to-right FMA chain for
// the g_J update measured slower at E = 16.)
template <typename S>
NTK_ALWAYS_INLINE void tile_pm(const S* th, int64_t ld, int64_t mi, int64_t mj, bool diag, const S* R, S* Y,
                               int64_t ldr, int ne, int64_t i0, int64_t j0) {
  if (diag) {  // upper triangle of the diagonal tile only
    for (int64_t i = 0; i < mi; ++i) {
      const S* t = th + i * ld;
      for (int e = 0; e < ne; ++e) {
        const S* RI = R + e * ldr + i0;
        const S* RJ = R + e * ldr + j0;
        S* YJ = Y + e * ldr + j0;
        const S ri = RI[i];
        S acc = t[i] * ri;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = i + 1; j < mj; ++j) {
          acc += t[j] * RJ[j];
          YJ[j] += t[j] * ri;
        }
        Y[e * ldr + i0 + i] += acc;
      }
    }
    return;
  }
  int64_t i = 0;
  for (; i + 4 <= mi; i += 4) {
    const S* t0 = th + i * ld;
    const S* t1 = t0 + ld;
    const S* t2 = t1 + ld;
    const S* t3 = t2 + ld;
    int e = 0;
    for (; e + 2 <= ne; e += 2) {
      const S* RA = R + e * ldr;
      const S* RB = RA + ldr;
      const S* ra = RA + j0;
      const S* rb = RB + j0;
      S* ya = Y + e * ldr + j0;
      S* yb = ya + ldr;
      strip_pair(t0, ld, mj, ra, rb, ya, yb, RA + i0 + i, RB + i0 + i, Y + e * ldr + i0 + i, Y + (e + 1) * ldr + i0 + i);
    }
    for (; e < ne; ++e) {
      const S* RA = R + e * ldr;
      const S* ra = RA + j0;
      S* ya = Y + e * ldr + j0;
      const S p0 = RA[i0 + i], p1 = RA[i0 + i + 1], p2 = RA[i0 + i + 2], p3 = RA[i0 + i + 3];
      S a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t j = 0; j < mj; ++j) {
        const S x = ra[j];
        a0 += t0[j] * x;
        a1 += t1[j] * x;
        a2 += t2[j] * x;
        a3 += t3[j] * x;
        ya[j] += (t0[j] * p0 + t1[j] * p1) + (t2[j] * p2 + t3[j] * p3);
      }
      S* YA = Y + e * ldr + i0 + i;
      YA[0] += a0;
      YA[1] += a1;
      YA[2] += a2;
      YA[3] += a3;
    }
  }
  for (; i < mi; ++i) {
    const S* t = th + i * ld;
    for (int e = 0; e < ne; ++e) {
      const S* RJ = R + e * ldr + j0;
      S* YJ = Y + e * ldr + j0;
      const S ri = R[e * ldr + i0 + i];
      S acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < mj; ++j) {
        acc += t[j] * RJ[j];
        YJ[j] += t[j] * ri;
      }
      Y[e * ldr + i0 + i] += acc;
    }
  }
}

template <typename S, bool ONE>
NTK_ALWAYS_INLINE void run_tiles_t(const TileJob<S>& job, int64_t begin, int64_t end, S* Y) {
  const int64_t T = job.T, n = job.n;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t bi = job.tiles[k].first, bj = job.tiles[k].second;
    const int64_t i0 = bi * T, j0 = bj * T;
    const int64_t mi = std::min(T, n - i0), mj = std::min(T, n - j0);
    const S* th;
    int64_t ld;
    if (job.packed) {
      th = job.theta + packed_tile_index(bi, bj, job.nt) * T * T;
      ld = T;
    } else {
      th = job.theta + i0 * n + j0;
      ld = n;
    }
    const bool diag = bi == bj;
    if (ONE)
      tile_1<S>(th, ld, mi, mj, diag, job.R + i0, job.R + j0, Y + i0, Y + j0);
    else
      tile_pm<S>(th, ld, mi, mj, diag, job.R, Y, n, job.ne, i0, j0);
  }
}

template <typename S>
NTK_ALWAYS_INLINE void run_tiles_switch(const TileJob<S>& job, int64_t b, int64_t e, S* Y) {
  if (job.ne == 1)
    run_tiles_t<S, true>(job, b, e, Y);
  else
    run_tiles_t<S, false>(job, b, e, Y);
}

NTK_CPU_CLONES void run_tiles_double(const TileJob<double>& job, int64_t b, int64_t e, double* Y) {
  run_tiles_switch<double>(job, b, e, Y);
}
NTK_CPU_CLONES void run_tiles_float(const TileJob<float>& job, int64_t b, int64_t e, float* Y) {
  run_tiles_switch<float>(job, b, e, Y);
}
inline void run_tiles(const TileJob<double>& job, int64_t b, int64_t e, double* Y) { run_tiles_double(job, b, e, Y); }
inline void run_tiles(const TileJob<float>& job, int64_t b, int64_t e, float* Y) { run_tiles_float(job, b, e, Y); }

// Yout[p][i] = sum_j theta[i][j] R[p][j] for p < ne (R, Yout: ne x n).
template <typename S>
void symmetric_product(const S* theta, bool packed, int64_t n, int64_t T, const S* R, int ne, S* Yout) {
  const int64_t nt = (n + T - 1) / T;
  std::vector<std::pair<int32_t, int32_t>> tiles;
  tiles.reserve(nt * (nt + 1) / 2);
  for (int64_t bi = 0; bi < nt; ++bi)
    for (int64_t bj = bi; bj < nt; ++bj) tiles.emplace_back((int32_t)bi, (int32_t)bj);
  const int64_t ntiles = (int64_t)tiles.size();
  // One private accumulator per chunk of tiles (a deterministic partition for a given thread count).
  // Small products run on one thread: a parallel region costs more than it saves below ~4M multiply-adds
  // (and on an oversubscribed machine its barrier can cost milliseconds).
  const int64_t work = n * n / 2 * ne;
  const int64_t nthreads =
      work < (int64_t)4000000 ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  const int64_t nchunks = nthreads;
  std::vector<S> Yall((size_t)nchunks * n * ne, S(0));
  TileJob<S> job{theta, packed, n, T, nt, R, ne, tiles.data()};
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t b = ntiles * ch / nchunks, e = ntiles * (ch + 1) / nchunks;
      run_tiles(job, b, e, Yall.data() + (size_t)ch * n * ne);
    }
  });
  // Sum the chunks in a fixed order.
  const int64_t total = n * ne;
  at::parallel_for(0, total, 4096, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      S s = Yall[k];
      for (int64_t ch = 1; ch < nchunks; ++ch) s += Yall[(size_t)ch * total + k];
      Yout[k] = s;
    }
  });
}

template <typename S>
void flow_step_cpu(const at::Tensor& theta, const at::Tensor& y, const at::Tensor& f, const at::Tensor& g,
                   const at::Tensor& r, const at::Tensor& c, const at::Tensor& dt, const at::Tensor& active,
                   Loss kind, double beta, int64_t packed_block, int64_t block, const FlowShape& s,
                   at::Tensor& fn, at::Tensor& rn, at::Tensor& gn, at::Tensor& cn, at::Tensor& stats) {
  const int64_t E = s.E, n = s.n;
  const S inv_n = S(1) / S(n);
  const S *py = y.data_ptr<S>(), *pf = f.data_ptr<S>(), *pg = g.data_ptr<S>(), *pr = r.data_ptr<S>(),
          *pc = c.data_ptr<S>(), *pdt = dt.data_ptr<S>();
  const bool* pa = active.data_ptr<bool>();
  S *qf = fn.data_ptr<S>(), *qr = rn.data_ptr<S>(), *qg = gn.data_ptr<S>(), *qc = cn.data_ptr<S>();
  double* st = stats.data_ptr<double>();
  std::vector<int64_t> act;
  for (int64_t e = 0; e < E; ++e) {
    double* se = st + e * 7;
    const int64_t o = e * n;
    if (!pa[e]) {
      std::copy(pf + o, pf + o + n, qf + o);
      std::copy(pr + o, pr + o + n, qr + o);
      std::copy(pg + o, pg + o + n, qg + o);
      std::copy(pc + o, pc + o + n, qc + o);
      for (int k = 0; k < 7; ++k) se[k] = 0.0;
      continue;
    }
    act.push_back(e);
    const S d = pdt[e];
    double gmax = 0.0, umin = std::numeric_limits<double>::infinity(), lsum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const S gi = pg[o + i], yi = py[o + i];
      const S fi = pf[o + i] - d * gi;
      const S u = yi * fi;
      qf[o + i] = fi;
      S l, dl;
      loss_and_grad<S>(kind, (S)beta, fi, yi, l, dl);
      qr[o + i] = dl;
      qc[o + i] = pc[o + i] + d * pr[o + i] * inv_n;
      gmax = std::max(gmax, std::abs((double)gi));
      if (std::isnan((double)gi)) gmax = std::numeric_limits<double>::quiet_NaN();
      umin = std::min(umin, (double)u);
      if (std::isnan((double)u)) umin = std::numeric_limits<double>::quiet_NaN();
      double ld, dld;  // the loss value in double, as the mean is accumulated in double
      loss_and_grad<double>(kind, beta, (double)fi, (double)yi, ld, dld);
      lsum += ld;
    }
    se[3] = std::isnan(gmax) ? gmax : (double)d * gmax;
    se[4] = umin;
    se[5] = lsum / (double)n;
  }
  if (act.empty()) return;

  const int64_t T = packed_block > 0 ? packed_block : (block > 0 ? block : 256);
  const S* th = theta.data_ptr<S>();
  const int64_t na = (int64_t)act.size();
  if (s.shared && na >= 2) {
    // Several problems sharing Theta: gather the active right-hand sides problem-major (na x n) and do one
    // pass over Theta for all of them with the point-vectorised tile kernel (tile_pm).
    std::vector<S> R((size_t)na * n), Y((size_t)na * n);
    for (int64_t p = 0; p < na; ++p) std::copy(qr + act[p] * n, qr + act[p] * n + n, R.data() + p * n);
    symmetric_product<S>(th, packed_block > 0, n, T, R.data(), (int)na, Y.data());
    for (int64_t p = 0; p < na; ++p) {
      S* ge = qg + act[p] * n;
      const S* yp = Y.data() + p * n;
      for (int64_t i = 0; i < n; ++i) ge[i] = yp[i] * inv_n;
    }
  } else {
    // One problem at a time (its own Theta, or a single active problem on the shared one).
    const int64_t stride = s.shared ? 0 : (packed_block > 0 ? packed_size(n, packed_block) : n * n);
    std::vector<S> Y((size_t)n);
    for (int64_t e : act) {
      symmetric_product<S>(th + e * stride, packed_block > 0, n, T, qr + e * n, 1, Y.data());
      S* ge = qg + e * n;
      for (int64_t i = 0; i < n; ++i) ge[i] = Y[i] * inv_n;
    }
  }
  for (int64_t e : act) {
    double a = 0, b = 0, dd = 0, mx = 0;
    const S *g0 = pg + e * n, *g1 = qg + e * n;
    for (int64_t i = 0; i < n; ++i) {
      const double x = g0[i], z = g1[i];
      a += x * x;
      b += z * z;
      dd += (x - z) * (x - z);
      mx = std::isnan(z) || std::isnan(mx) ? std::numeric_limits<double>::quiet_NaN() : std::max(mx, std::abs(z));
    }
    double* se = st + e * 7;
    se[0] = a;
    se[1] = b;
    se[2] = dd;
    se[6] = mx;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kernel_flow_step_cpu(
    const at::Tensor& theta_, const at::Tensor& y_, const at::Tensor& f_, const at::Tensor& g_,
    const at::Tensor& r_, const at::Tensor& c_, const at::Tensor& dt_, const at::Tensor& active_,
    c10::string_view loss, double beta, int64_t packed_block, int64_t block) {
  const FlowShape s = check_flow_args(theta_, y_, f_, g_, r_, c_, dt_, active_, packed_block);
  const Loss kind = parse_loss(loss, "kernel_flow_step");
  TORCH_CHECK(block >= 0, "kernel_flow_step: block must be >= 0, got ", block);
  const at::Tensor theta = theta_.contiguous(), y = y_.contiguous(), f = f_.contiguous(), g = g_.contiguous(),
                   r = r_.contiguous(), c = c_.contiguous(), dt = dt_.contiguous(), active = active_.contiguous();
  at::Tensor fn = at::empty_like(f), rn = at::empty_like(f), gn = at::empty_like(f), cn = at::empty_like(f);
  at::Tensor stats = at::empty({s.E, 7}, f.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "kernel_flow_step_cpu", [&] {
    flow_step_cpu<scalar_t>(theta, y, f, g, r, c, dt, active, kind, beta, packed_block, block, s, fn, rn, gn, cn,
                            stats);
  });
  return {fn, rn, gn, cn, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CPU, m) { m.impl("kernel_flow_step", &kernel_flow_step_cpu); }

}  // namespace ntk_fast
