// The one registration file: op schemas of the namespace ntk_fast and the Python module stub.
// Kernels register themselves per dispatch key next to their sources (csrc/<op>/<op>_cpu.cpp, *_cuda.cu).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import ntk_fast._C` only needs to load the library so that the static registrations below run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ntk_fast, m) {
  // out[i, j] = sum_l scales[l] * (d1[l][i] . d2[l][j]) * (a1[l][i] . a2[l][j]).
  // a2 = d2 = None: the Gram of (a1, d1) with itself (upper tiles computed, mirrored; exactly symmetric).
  // block: tile edge (0 = automatic).  precision: "highest" (IEEE float32/float64) or "tf32" (CUDA tensor
  // cores for float32 features; the CPU kernel treats it as "highest").  gram.out writes into a
  // preallocated (n1, n2) tensor of the features' dtype and device (e.g. a memory-mapped array).
  m.def("gram(Tensor[] a1, Tensor[] d1, Tensor[]? a2, Tensor[]? d2, float[] scales, int block=0, str precision=\"highest\") -> Tensor");
  m.def("gram.out(Tensor[] a1, Tensor[] d1, Tensor[]? a2, Tensor[]? d2, float[] scales, int block, str precision, *, Tensor(a!) out) -> ()");
  // gram_full: out[i, j, c, c'] = sum_l scales[l] sum_{t, t'} (a1[l][i, t] . a2[l][j, t']) (d1[l][i, c, t] . d2[l][j, c', t'])
  // a[l] (n, T_l, p_l), d[l] (n, k, T_l, q_l), out (n1, n2, k, k): the NTK of any model in mode "full" with the A
  // products shared by the k x k output pairs (T = 1), the token-pair form (T > 1), or a Gram of per-sample
  // gradients (a = ones (n, 1, 1)).  a2 = d2 = None: symmetric (upper tiles computed, mirrored; exactly symmetric).
  // w: None, or one entry per layer: None (d[l] as above) or a (k, q_l) factor, with d[l] (n, 1, 1, q_l) = s and
  // D[i, c] = s_i o w_c (the layer below a linear readout): its k x k blocks are symmetric, k(k+1)/2 products.
  m.def("gram_full(Tensor[] a1, Tensor[] d1, Tensor[]? a2, Tensor[]? d2, float[] scales, int block=0, Tensor?[]? w=None) -> Tensor");
  m.def("gram_full.out(Tensor[] a1, Tensor[] d1, Tensor[]? a2, Tensor[]? d2, float[] scales, int block, Tensor?[]? w=None, *, Tensor(a!) out) -> ()");
  // Gradient-flow trainer (ntk_fast/flow.py; maths in csrc/flow/flow_cpu.cpp).  K nets stored row-wise in (K, P).
  // flow_step: w_out = w - dt g (tau == 0), or v_out = x v - (1 - x) g, w_out = w + dt v_out with x = exp(-dt/tau).
  m.def("flow_step(Tensor w, Tensor g, Tensor v, Tensor dt, float tau, Tensor(a!) w_out, Tensor(b!) v_out) -> ()");
  // flow_grad_stats: (K, 2) float64 [|gp|^2, |g - gp|^2] per net.
  m.def("flow_grad_stats(Tensor g, Tensor gp) -> Tensor");
  // flow_loss: (F, r, loss, nd, dout) from outputs f, f0 (K, n), labels/targets y (n,), previous F (K, n);
  // loss: softhinge | qhinge | hinge | mse (csrc/common/loss.h; beta used by softhinge).
  m.def("flow_loss(Tensor f, Tensor f0, Tensor y, Tensor F_prev, float alpha, float beta, str loss) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // softplus_act: the trainer's activation, in place: with x = beta z,  z <- (c / beta) softplus(x)  and, when s is
  // not empty, s <- c sigmoid(x)  (evaluated without overflow; csrc/flow/act_cpu.cpp).
  m.def("softplus_act(Tensor(a!) z, Tensor(b!) s, float beta, float c) -> ()");
  // One attempt of the frozen-kernel flow for E problems (rows of the (E, n) state f, g, r, c, y):
  //   f' = f - dt g;  r' = dl/dF(f', y);  c' = c + dt r / n;  g' = Theta r' / n
  //   stats (E x 7, float64) = [|g|^2, |g'|^2, |g - g'|^2, dt max|g|, min y o f', mean l(f', y), max|g'|].
  // theta: (n, n) shared or (E, n, n) per problem, symmetric, only the upper triangle is read; or, with
  // packed_block = T > 0, tile-packed upper triangle (P,) / (E, P) (csrc/common/packed.h).  loss: as flow_loss.  Inactive problems (active[e] = False) pass through unchanged with zero stats.
  // block: tile edge for full storage (0 = automatic).
  m.def("kernel_flow_step(Tensor theta, Tensor y, Tensor f, Tensor g, Tensor r, Tensor c, Tensor dt, Tensor active, str loss, float beta, int packed_block=0, int block=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // limit_kernels: infinite-width (nngp, ntk) of FCNet, each (n1, n2) in x1's dtype (ntk_fast/ops/reference_limits.py).
  // q1 (L, n1), q2 (L, n2): per-layer variances; table (L, 4, K+1) equal-norm correlation maps or empty; nodes,
  // weights (m,) quadrature rule for softplus/tanh; symmetric: x2, q2 ignored, upper tiles mirrored.
  m.def("limit_kernels(Tensor x1, Tensor x2, Tensor q1, Tensor q2, Tensor table, Tensor nodes, Tensor weights, bool symmetric, int L, str activation, float beta, float c, float bias, int block=0) -> (Tensor, Tensor)");
}
