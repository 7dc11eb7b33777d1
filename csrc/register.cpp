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
  // symmetric=True: a2/d2 must be empty lists; the Gram of (a1, d1) with itself, upper tiles mirrored.
  // block: tile edge (0 = automatic).  precision: "highest" (IEEE float32/float64) or "tf32" (CUDA tensor
  // cores for float32 features; the CPU kernel treats it as "highest").
  m.def("gram(Tensor[] a1, Tensor[] d1, Tensor[] a2, Tensor[] d2, float[] scales, bool symmetric, int block=0, str precision=\"highest\") -> Tensor");
  m.def("gram_out(Tensor[] a1, Tensor[] d1, Tensor[] a2, Tensor[] d2, float[] scales, bool symmetric, int block, str precision, Tensor(a!) out) -> ()");
}
