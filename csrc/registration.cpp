// Every schema of the kvq namespace, in one place. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/ops_cuda.cpp; fakes live in src/torchkvq/_meta.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import torchkvq._C` only has to load this shared object so that the static
// TORCH_LIBRARY initializers below run; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kvq, m) {
  m.def(
      "quantize(Tensor x, int bits, int group_size, int axis, ScalarType? scale_dtype=None)"
      " -> (Tensor codes, Tensor scale, Tensor zero)");
  m.def(
      "dequantize(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, int axis,"
      " ScalarType dtype) -> Tensor");
}
