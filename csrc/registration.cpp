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
  m.def("outlier_split(Tensor x, int n_low, int n_high) -> (Tensor dense, Tensor index, Tensor value)");
  m.def(
      "dequant_matmul(Tensor a, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size,"
      " int axis, bool transpose_b, Tensor? outlier_index=None, Tensor? outlier_value=None)"
      " -> Tensor");
  m.def(
      "quant_attention(Tensor query, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor k_bits,"
      " Tensor v_codes, Tensor v_scale, Tensor v_zero, Tensor v_bits, Tensor k_fp, Tensor v_fp,"
      " Tensor fp_pos, Tensor? q_exclude, Tensor? k_outlier_index, Tensor? k_outlier_value,"
      " Tensor? v_outlier_index, Tensor? v_outlier_value, int group_size, int v_group_size,"
      " float scale, bool causal, bool return_stats, int q_offset=0, int? window=None,"
      " float? softcap=None) -> (Tensor out, Tensor lse, Tensor stats)");
  m.def(
      "remat_kv(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, Tensor weight,"
      " Tensor? bias, Tensor? cos, Tensor? sin, int rope_dim) -> Tensor");
  m.def(
      "write_tokens(Tensor(a!) k_fp, Tensor(b!) v_fp, Tensor(c!) fp_pos, Tensor key, Tensor value,"
      " Tensor slots, Tensor positions) -> ()");
}
