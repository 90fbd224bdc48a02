// The fsam_fused operator schemas (declared once, here) and the Python module `fsam_fused._C`
// whose import loads this library and so registers the ops. Implementations live in
// cpu/ and cuda/, one file per op family; fake (meta) implementations beside the Python
// wrappers in fsam_fused/_ops.py.
#include <Python.h>
#include <torch/library.h>

#ifndef FSAM_FUSED_CUDA_ARCHS
#define FSAM_FUSED_CUDA_ARCHS ""
#endif

extern "C" {
// A plain module with no functions: the ops are reached through torch.ops.fsam_fused.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // The CUDA targets this build was compiled for ("" without CUDA), so tests and users
  // can check that a wheel holds what it was asked to.
  if (module != nullptr && PyModule_AddStringConstant(module, "cuda_arch_list", FSAM_FUSED_CUDA_ARCHS) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(fsam_fused, m) {
  // sum over tensors of ||a * d||^2, d = g * inv_scale - sigma * m, a = |p| if adaptive;
  // an fp32 0-d tensor on the params' device. `momentum` is empty when there is none.
  m.def(
      "sq_norm(Tensor[] params, Tensor[] grads, Tensor[] momentum, Tensor coef, Tensor? inv_scale) -> Tensor");
  // With scale = rho / (sqrt(total_sq_norm) + eps) computed on the device: backup <- p;
  // and only if total_sq_norm is finite: m <- lmbda * m + (1 - lmbda) * g, p <- p + a^2 * d * scale.
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum, Tensor(c!)[] backup, "
      "Tensor coef, Tensor total_sq_norm, float eps, Tensor? inv_scale) -> ()");
  // p <- backup, a bit-exact copy.
  m.def("restore_(Tensor(a!)[] params, Tensor[] backup) -> ()");
}
