#include "native_lists.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/python_variable.h>

#include "../tensor_lists.h"

#include <utility>

namespace fsam_fused::host {
namespace {

// Typed handles of the ops declared in csrc/ops.cpp; the dispatcher picks the CPU or CUDA
// implementation from the tensors' device, as a call from Python would.
const auto& sq_norm_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fsam_fused::sq_norm", "")
          .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op;
}

const auto& perturb_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fsam_fused::perturb_", "")
                             .typed<void(
                                 at::TensorList,
                                 at::TensorList,
                                 at::TensorList,
                                 at::TensorList,
                                 const at::Tensor&,
                                 const at::Tensor&,
                                 double,
                                 const std::optional<at::Tensor>&)>();
  return op;
}

const auto& restore_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fsam_fused::restore_", "")
                             .typed<void(at::TensorList, at::TensorList)>();
  return op;
}

// The ops have no autograd formula, so a call from Python reaches them through torch's boxed
// autograd fallback, which boxes every tensor of every list and checks each one: per step,
// that costs more than the rest of the step's host work together. These calls run below
// the autograd keys instead (the optimizer steps under no_grad), and bump the version
// counters of what the op writes, as the fallback would, so autograd still notices a
// parameter modified while a graph holds it.
void bump_versions(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors) {
    torch::autograd::increment_version(t);
  }
}

}  // namespace

NativeLists::NativeLists(
    std::vector<pybind11::object> params,
    std::vector<at::Tensor> momentum,
    std::vector<at::Tensor> backup,
    std::vector<int64_t> positions)
    : params_(std::move(params)),
      momentum_(std::move(momentum)),
      backup_(std::move(backup)),
      positions_(std::move(positions)) {
  TORCH_CHECK(
      positions_.size() == params_.size() && backup_.size() == params_.size() &&
          (momentum_.empty() || momentum_.size() == params_.size()),
      "NativeLists: params, backup, positions (and momentum unless empty) must be equally long");
  for (const pybind11::object& p : params_) {
    TORCH_CHECK(THPVariable_Check(p.ptr()), "NativeLists: parameters must be tensors");
  }
}

BorrowedTensors::~BorrowedTensors() {
  for (at::Tensor& t : tensors) {
    c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
}

BorrowedTensors NativeLists::params_now() const {
  // Borrowed, not copied: a copy would write every parameter's reference count twice per call,
  // one cache line each, which cost more than the kernels on a model of small tensors. Safe
  // because the call holds the GIL (module.cpp): nothing can swap or free what the parameters'
  // Python objects hold until it returns.
  BorrowedTensors params;
  params.tensors.reserve(params_.size());
  for (const pybind11::object& p : params_) {
    params.tensors.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(p.ptr())));
  }
  return params;
}

BorrowedTensors NativeLists::grads_of(const ParamScan& scan) const {
  BorrowedTensors grads;  // the scan holds them until its release()
  grads.tensors.reserve(positions_.size());
  for (int64_t pos : positions_) {
    grads.tensors.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(scan.grad(pos)));
  }
  return grads;
}

at::Tensor NativeLists::sq_norm(
    const ParamScan& scan, const at::Tensor& coef, const std::optional<at::Tensor>& inv_scale) const {
  const PrecheckedLists prechecked(sq_norm_checked_.current(scan));
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const BorrowedTensors params = params_now();
  at::Tensor out = sq_norm_op().call(params.tensors, grads_of(scan).tensors, momentum_, coef, inv_scale);
  sq_norm_checked_.record(scan);
  return out;
}

void NativeLists::perturb_(
    const ParamScan& scan,
    const at::Tensor& coef,
    const at::Tensor& total_sq_norm,
    double eps,
    const std::optional<at::Tensor>& inv_scale) const {
  const BorrowedTensors params = params_now();
  {
    const PrecheckedLists prechecked(perturb_checked_.current(scan));
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    perturb_op().call(
        params.tensors, grads_of(scan).tensors, momentum_, backup_, coef, total_sq_norm, eps, inv_scale);
  }
  perturb_checked_.record(scan);
  bump_versions(params.tensors);
  bump_versions(momentum_);
  bump_versions(backup_);
}

void NativeLists::restore_() const {
  if (!params_.empty()) {
    const BorrowedTensors params = params_now();
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      restore_op().call(params.tensors, backup_);
    }
    bump_versions(params.tensors);
  }
}

}  // namespace fsam_fused::host
