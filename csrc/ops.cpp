// The fsam_fused operator schemas, declared once, here. Implementations live in cpu/ and
// cuda/, one file per op family; fake (meta) implementations beside the Python wrappers in
// fsam_fused/_ops.py. The Python module that loads this library is csrc/host/module.cpp.
#include <torch/library.h>

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
