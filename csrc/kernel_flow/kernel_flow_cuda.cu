// CUDA kernel of ntk_fast::kernel_flow_step (semantics in kernel_flow_cpu.cpp / reference_kernel.py).
//
// 1. elementwise kernel: f' = f - dt g, r' = l'(y f') y, c' = c + dt r / n, u' = y f', l(u') (active rows;
//    l(u') is evaluated and averaged in float64 for either dtype, as on the CPU);
// 2. symmetric product: one thread block per upper tile (I <= J) of Theta (full or tile-packed storage); the
//    64 x 64 tile is staged in shared memory once and used for every problem sharing it: row sums
//    Theta_IJ r_J -> g_I and, off the diagonal, column sums Theta_IJ^T r_I -> g_J, accumulated with atomicAdd
//    (so the summation order, and the last bits of g', vary from run to run on the GPU);
// 3. reductions for the stats with ATen ops (O(E n)).
// Theta is read once per attempt (its upper half); everything else is O(E n).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernel_flow_common.h"

namespace ntk_fast {
namespace {

constexpr int TILE = 64;
constexpr int THREADS = 256;
constexpr int PCHUNK = 8;  // problems staged in shared memory at a time

template <typename S>
__global__ void elementwise_kernel(const S* __restrict__ y, const S* __restrict__ f, const S* __restrict__ g,
                                   const S* __restrict__ r, const S* __restrict__ c, const S* __restrict__ dt,
                                   const bool* __restrict__ active, int64_t n, Loss kind, S beta, S inv_n,
                                   S* __restrict__ fn, S* __restrict__ rn, S* __restrict__ cn, S* __restrict__ u_out,
                                   double* __restrict__ l_out) {
  const int64_t e = blockIdx.y;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t k = e * n + i;
  if (!active[e]) {
    fn[k] = f[k];
    rn[k] = r[k];
    cn[k] = c[k];
    u_out[k] = S(0);
    l_out[k] = 0.0;
    return;
  }
  const S d = dt[e];
  const S fi = f[k] - d * g[k];
  const S u = y[k] * fi;
  fn[k] = fi;
  S l, dl;
  loss_and_grad<S>(kind, beta, fi, y[k], l, dl);
  rn[k] = dl;
  cn[k] = c[k] + d * r[k] * inv_n;
  u_out[k] = u;
  double ld, dld;  // the loss value in double, as the CPU kernel
  loss_and_grad<double>(kind, static_cast<double>(beta), static_cast<double>(fi), static_cast<double>(y[k]), ld, dld);
  l_out[k] = ld;
}

// grid: (nt, nt, number of kernels); blocks with bj < bi exit.  prob: active problem ids (np of them);
// shared Theta: every block serves all np problems; per-problem Theta: blockIdx.z is the position in prob.
template <typename S>
__global__ void symv_tiles_kernel(const S* __restrict__ theta, int64_t theta_stride, bool packed, bool shared_theta,
                                  int64_t n, int64_t nt, int64_t T, const int64_t* __restrict__ prob, int np,
                                  const S* __restrict__ R, S inv_n, S* __restrict__ G) {
  const int64_t bi = blockIdx.y, bj = blockIdx.x;
  if (bj < bi) return;
  __shared__ S th[TILE][TILE + 1];
  __shared__ S rI[PCHUNK][TILE];
  __shared__ S rJ[PCHUNK][TILE];
  const int64_t i0 = bi * T, j0 = bj * T;
  const int mi = (int)(T < n - i0 ? T : n - i0), mj = (int)(T < n - j0 ? T : n - j0);
  const int tid = threadIdx.x;
  const int zk = shared_theta ? 0 : blockIdx.z;
  const S* base = theta + (shared_theta ? 0 : prob[zk] * theta_stride);
  const S* tp;
  int64_t ld;
  if (packed) {
    tp = base + ((bi * nt - bi * (bi - 1) / 2) + (bj - bi)) * T * T;
    ld = T;
  } else {
    tp = base + i0 * n + j0;
    ld = n;
  }
  const bool diag = bi == bj;
  // Diagonal tiles: only their upper triangle is read and mirrored (Theta is used through its upper half).
  for (int k = tid; k < TILE * TILE; k += THREADS) {
    const int a = k / TILE, b = k % TILE;
    const int aa = diag && a > b ? b : a, bb = diag && a > b ? a : b;
    th[a][b] = (a < mi && b < mj) ? tp[aa * ld + bb] : S(0);
  }
  const int p_begin = shared_theta ? 0 : zk, p_end = shared_theta ? np : zk + 1;
  const int lane = tid % TILE, part = tid / TILE;  // 4 parts of 16
  for (int p0 = p_begin; p0 < p_end; p0 += PCHUNK) {
    const int pc = min(PCHUNK, p_end - p0);
    __syncthreads();
    for (int k = tid; k < PCHUNK * TILE; k += THREADS) {
      const int q = k / TILE, a = k % TILE;
      if (q < pc) {
        const S* rp = R + prob[p0 + q] * n;
        rI[q][a] = a < mi ? rp[i0 + a] : S(0);
        rJ[q][a] = a < mj ? rp[j0 + a] : S(0);
      }
    }
    __syncthreads();
    for (int q = 0; q < pc; ++q) {
      S* gp = G + prob[p0 + q] * n;
      // row sums: row = lane, columns part*16 .. part*16+15
      S acc = 0;
#pragma unroll
      for (int b = 0; b < TILE / 4; ++b) acc += th[lane][part * (TILE / 4) + b] * rJ[q][part * (TILE / 4) + b];
      if (lane < mi) atomicAdd(gp + i0 + lane, acc * inv_n);
      if (!diag) {
        S acc2 = 0;
#pragma unroll
        for (int a = 0; a < TILE / 4; ++a) acc2 += th[part * (TILE / 4) + a][lane] * rI[q][part * (TILE / 4) + a];
        if (lane < mj) atomicAdd(gp + j0 + lane, acc2 * inv_n);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kernel_flow_step_cuda(
    const at::Tensor& theta_, const at::Tensor& y_, const at::Tensor& f_, const at::Tensor& g_,
    const at::Tensor& r_, const at::Tensor& c_, const at::Tensor& dt_, const at::Tensor& active_,
    c10::string_view loss, double beta, int64_t packed_block, int64_t block) {
  TORCH_CHECK(f_.is_cuda(), "kernel_flow_step (CUDA kernel): f must be on a CUDA device, got ", f_.device(),
              "; all tensors of one call must be on the same device");
  const FlowShape s = check_flow_args(theta_, y_, f_, g_, r_, c_, dt_, active_, packed_block);
  TORCH_CHECK(block >= 0, "kernel_flow_step: block must be >= 0, got ", block);
  const Loss kind = parse_loss(loss, "kernel_flow_step");
  const c10::cuda::CUDAGuard guard(f_.device());
  const at::Tensor theta = theta_.contiguous(), y = y_.contiguous(), f = f_.contiguous(), g = g_.contiguous(),
                   r = r_.contiguous(), c = c_.contiguous(), dt = dt_.contiguous(), active = active_.contiguous();
  const int64_t E = s.E, n = s.n;
  // Tile edge: the packed layout fixes it; full storage uses TILE (block must be 0 or TILE on the GPU).
  const int64_t T = packed_block > 0 ? packed_block : TILE;
  TORCH_CHECK(T == TILE, "kernel_flow_step (CUDA): the tile edge must be ", TILE, " (packed_block ", packed_block,
              ")");
  // block is the CPU's tile hint (validated above like the CPU does); the GPU's tile edge is TILE.
  at::Tensor fn = at::empty_like(f), rn = at::empty_like(f), cn = at::empty_like(f);
  at::Tensor gn = at::zeros_like(f);
  at::Tensor u = at::empty_like(f), lu = at::empty_like(f, f.options().dtype(at::kDouble));
  at::Tensor prob = at::nonzero(active).flatten().to(at::kLong);  // syncs once (small)
  const int np = (int)prob.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "kernel_flow_step_cuda", [&] {
    const scalar_t inv_n = scalar_t(1) / scalar_t(n);
    dim3 g1((unsigned)((n + 255) / 256), (unsigned)E);
    elementwise_kernel<scalar_t><<<g1, 256, 0, stream>>>(
        y.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
        c.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), active.data_ptr<bool>(), n, kind, (scalar_t)beta, inv_n,
        fn.data_ptr<scalar_t>(), rn.data_ptr<scalar_t>(), cn.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
        lu.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (np > 0) {
      const int64_t nt = (n + T - 1) / T;
      const int64_t stride = packed_block > 0 ? packed_size(n, packed_block) : n * n;
      dim3 g2((unsigned)nt, (unsigned)nt, (unsigned)(s.shared ? 1 : np));
      symv_tiles_kernel<scalar_t><<<g2, THREADS, 0, stream>>>(
          theta.data_ptr<scalar_t>(), stride, packed_block > 0, s.shared, n, nt, T, prob.data_ptr<int64_t>(), np,
          rn.data_ptr<scalar_t>(), inv_n, gn.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const at::Tensor act2 = active.unsqueeze(1);
  gn = at::where(act2, gn, g);
  const at::Tensor g64 = g.to(at::kDouble), gn64 = gn.to(at::kDouble), dt64 = dt.to(at::kDouble);
  at::Tensor stats = at::stack({g64.square().sum(1), gn64.square().sum(1), (g64 - gn64).square().sum(1),
                                dt64 * g64.abs().amax(1), u.to(at::kDouble).amin(1), lu.mean(1),
                                gn64.abs().amax(1)},
                               1);
  stats = at::where(act2, stats, at::zeros_like(stats));
  return {fn, rn, gn, cn, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_fast, CUDA, m) { m.impl("kernel_flow_step", &kernel_flow_step_cuda); }

}  // namespace ntk_fast
