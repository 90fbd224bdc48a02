#include "native_lists.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/python_variable.h>

#include "../fsam_math.h"
#include "../tensor_lists.h"
#include "object_prefetch.h"
#include "parallel_tensors.h"
#include "cpu_scalar.h"

#include <algorithm>
#include <unordered_set>
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

// The same, through version counters kept from the tensors: those of the optimizer's own momentum
// and backup views, which no one else can re-point, and those of the parameters, which the caller
// has just found unchanged (same_tensor compares their counters too). Over many small parameters
// each counter is an allocation of its own, so a bump is a miss that an atomic update overlaps with
// nothing: the counters kBumpAhead places ahead are asked for first. A tensor without a counter
// (an inference tensor) is bumped last, where bump() refuses outside inference mode as
// increment_version would, so the counted ones are bumped whatever it does.
void bump(std::vector<c10::VariableVersion>& versions) {
  constexpr size_t kBumpAhead = 16;
  for (size_t i = 0; i < std::min(versions.size(), kBumpAhead); ++i) {
    prefetch_version_counter(versions[i]);
  }
  bool uncounted = false;
  for (size_t i = 0; i < versions.size(); ++i) {
    if (i + kBumpAhead < versions.size()) {
      prefetch_version_counter(versions[i + kBumpAhead]);
    }
    if (versions[i].enabled()) {
      versions[i].bump();
    } else {
      uncounted = true;
    }
  }
  if (uncounted) {
    for (c10::VariableVersion& version : versions) {
      if (!version.enabled()) {
        version.bump();
      }
    }
  }
}

// A checked fp32 one-element CPU tensor's value, read in place as the CPU kernels read it (not
// through .item(), an operator of its own that would count as a host read in the step).
float value_of(const at::Tensor& t) {
  return *t.const_data_ptr<float>();
}

// Whether any row of a checked coefficient table is adaptive (its kernels read the parameter).
bool any_adaptive(const at::Tensor& coef) {
  const float* rows = coef.const_data_ptr<float>();
  for (int64_t i = 0; i < coef.size(0); ++i) {
    if (rows[i * kCoefColumns + kAdaptive] != 0.0f) {
      return true;
    }
  }
  return false;
}

float unscale_of(const std::optional<at::Tensor>& inv_scale) {
  return inv_scale.has_value() ? value_of(*inv_scale) : 1.0f;
}

// The O(1) checks of an op call on kept CPU lists (the per-tensor ones passed when they were kept).
void check_cpu_call(
    const char* op,
    const at::Tensor& coef,
    const at::Tensor* total_sq_norm,
    const std::optional<at::Tensor>& inv_scale,
    size_t n) {
  const c10::Device cpu(c10::kCPU);
  TORCH_CHECK(coef.device() == cpu, op, ": coef is on ", coef.device(), " but the params are on the CPU");
  check_coef(op, coef, n);
  if (total_sq_norm != nullptr) {
    check_scalar(op, "total_sq_norm", *total_sq_norm, cpu);
  }
  if (inv_scale.has_value()) {
    check_scalar(op, "inv_scale", *inv_scale, cpu);
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
  if (!backup_.empty()) {
    device_ = backup_.front().device();
  }
  on_cpu_ = !backup_.empty() && device_.is_cpu();
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
  for (const pybind11::object& p : params_) {  // (see kPrefetchBlock)
    prefetch_python_tensor(p.ptr());
  }
  for (const pybind11::object& p : params_) {
    params.tensors.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(p.ptr())));
    prefetch_impl(params.tensors.back().unsafeGetTensorImpl());
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
  const bool checked = sq_norm_checked_.current(scan) && kept_.has_value() && kept_at_.current(scan);
  if (checked && runs_flat()) {
    RECORD_FUNCTION("fsam_fused::sq_norm", c10::ArrayRef<const c10::IValue>{});  // for the profiler
    check_cpu_call("sq_norm", coef, nullptr, inv_scale, params_.size());
    // The kept lists fix every size; the parameters' data is read only where adaptive (ASAM), and
    // only then must they still be what was kept.
    if (!any_adaptive(coef) || params_unchanged()) {
      const double sum = cpu::sq_norm_flat(with_grads(scan), coef.data_ptr<float>(), unscale_of(inv_scale));
      return cpu_scalar(static_cast<float>(sum));
    }
  }
  const bool unchanged = checked && params_unchanged();
  const BorrowedTensors params = params_now();
  at::Tensor out;
  {
    const PrecheckedLists prechecked(unchanged);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = sq_norm_op().call(params.tensors, grads_of(scan).tensors, momentum_, coef, inv_scale);
  }
  if (!unchanged) {
    sq_norm_checked_.record(scan);
    keep(params, scan);
  }
  return out;
}

void NativeLists::perturb_(
    const ParamScan& scan,
    const at::Tensor& coef,
    const at::Tensor& total_sq_norm,
    double eps,
    const std::optional<at::Tensor>& inv_scale) const {
  const bool unchanged = perturb_checked_.current(scan) && still_kept(&scan);
  if (unchanged && runs_flat()) {
    RECORD_FUNCTION("fsam_fused::perturb_", c10::ArrayRef<const c10::IValue>{});
    check_cpu_call("perturb_", coef, &total_sq_norm, inv_scale, params_.size());
    cpu::perturb_flat(
        with_grads(scan), coef.data_ptr<float>(), value_of(total_sq_norm), static_cast<float>(eps),
        unscale_of(inv_scale));
    bump(kept_->param_versions);
    bump(kept_->state_versions);
    return;
  }
  const BorrowedTensors params = params_now();
  {
    const PrecheckedLists prechecked(unchanged);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    perturb_op().call(
        params.tensors, grads_of(scan).tensors, momentum_, backup_, coef, total_sq_norm, eps, inv_scale);
  }
  if (!unchanged) {
    perturb_checked_.record(scan);
    keep(params, scan);
  }
  bump_versions(params.tensors);
  bump_versions(momentum_);
  bump_versions(backup_);
}

bool NativeLists::first_pass_ready(const ParamScan& scan) const {
  return runs_flat() && kept_.has_value() && kept_at_.current(scan) && sq_norm_checked_.current(scan) &&
      perturb_checked_.current(scan);
}

std::pair<bool, std::optional<at::Tensor>> NativeLists::first_pass(
    ParamScan& scan,
    const pybind11::list& param_lists,
    const at::Tensor& coef,
    double eps,
    const std::optional<at::Tensor>& inv_scale) const {
  // (A scan that sees no change keeps its generation, so this holds after it as before.)
  const bool flat = first_pass_ready(scan);
  if (scan.scan(param_lists, /*hold=*/!flat)) {
    return {true, std::nullopt};
  }
  if (!flat || (scan.python_may_have_run() && !params_unchanged())) {
    return {false, std::nullopt};
  }
  const cpu::FlatLists& lists = with_grads(scan);
  const float unscale = unscale_of(inv_scale);
  float total = 0.0f;
  {
    RECORD_FUNCTION("fsam_fused::sq_norm", c10::ArrayRef<const c10::IValue>{});  // for the profiler
    check_cpu_call("sq_norm", coef, nullptr, inv_scale, params_.size());
    // (As sq_norm_ returns it and perturb_ reads it: the fp32 rounding of the double sum.)
    total = static_cast<float>(cpu::sq_norm_flat(lists, coef.data_ptr<float>(), unscale));
  }
  {
    RECORD_FUNCTION("fsam_fused::perturb_", c10::ArrayRef<const c10::IValue>{});
    cpu::perturb_flat(lists, coef.data_ptr<float>(), total, static_cast<float>(eps), unscale);
    bump(kept_->param_versions);
    bump(kept_->state_versions);
  }
  return {false, cpu_scalar(total)};
}

void NativeLists::restore_() const {
  if (params_.empty()) {
    return;
  }
  if (runs_flat() && still_kept(nullptr)) {
    RECORD_FUNCTION("fsam_fused::restore_", c10::ArrayRef<const c10::IValue>{});
    cpu::restore_flat(kept_->lists);
    bump(kept_->param_versions);
    return;
  }
  const BorrowedTensors params = params_now();
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    restore_op().call(params.tensors, backup_);
  }
  bump_versions(params.tensors);
}

bool NativeLists::runs_flat() const {
  // A Python dispatch mode (a tracer, FakeTensorMode, a debugging mode) must see the ops: under
  // one, the calls go through the dispatcher as from Python.
  return on_cpu_ && !c10::impl::dispatch_mode_enabled();
}

bool NativeLists::still_kept(const ParamScan* scan) const {
  return kept_.has_value() && (scan == nullptr || kept_at_.current(*scan)) && params_unchanged();
}

void NativeLists::keep(const BorrowedTensors& params, const ParamScan& scan) const {
  kept_.reset();  // until it is whole
  for (size_t i = 0; i < params.tensors.size(); ++i) {
    if (!scan.saw(positions_[i], params.tensors[i])) {
      return;  // re-pointed since the scan (by another thread): the next scan sees it, and keeps
    }
  }
  Kept kept;
  kept.lists = cpu::FlatLists::of(params.tensors, {}, momentum_, backup_);
  kept.lists.grads.resize(params_.size());
  for (const at::Tensor& p : params.tensors) {
    kept.impls.push_back(p.unsafeGetTensorImpl());
    kept.geometry.emplace_back().record(p);
    kept.param_versions.push_back(p.unsafeGetTensorImpl()->version_counter());
  }
  // Each counter once: the momentum and backup views share their flat buffer's, and a bump says
  // "written" to autograd, which compares versions only for equality, as well as one per view
  // (thousands of atomic increments of one line, each step, over a model of small tensors).
  std::unordered_set<const void*> counters;
  for (const std::vector<at::Tensor>* state : {&momentum_, &backup_}) {
    for (const at::Tensor& t : *state) {
      const void* counter = version_counter_address(t.unsafeGetTensorImpl());
      if (counter == nullptr || counters.insert(counter).second) {  // (none: bump() refuses, as ever)
        kept.state_versions.push_back(t.unsafeGetTensorImpl()->version_counter());
      }
    }
  }
  kept_ = std::move(kept);
  kept_at_.record(scan);
}

const cpu::FlatLists& NativeLists::with_grads(const ParamScan& scan) const {
  cpu::FlatLists& lists = kept_->lists;
  const std::vector<const void*>& addresses = scan.grad_addresses();
  for (size_t i = 0; i < positions_.size(); ++i) {
    const int64_t pos = positions_[i];
    TORCH_CHECK(pos < static_cast<int64_t>(addresses.size()), "NativeLists: position out of the scan's range");
    const void* g = addresses[pos];
    // (The scan's generation says the set of gradients did not change; a released scan has none.)
    TORCH_CHECK(
        g != nullptr || lists.starts[i + 1] == lists.starts[i], "NativeLists: a plan's parameter has no gradient");
    lists.grads[i] = static_cast<const char*>(g);
  }
  return lists;
}

bool NativeLists::params_unchanged() const {
  // Safe without a reference to each parameter because the call holds the GIL (module.cpp):
  // nothing can swap or free what their Python objects hold until it returns. Reads only, shared
  // with the helper thread (parallel_tensors.h); a parameter whose TensorImpl was not kept is not
  // read further (same_tensor compares it first), so no subclass's code runs there.
  return all_chunks(params_.size(), [this](size_t begin, size_t end) { return params_unchanged_in(begin, end); });
}

bool NativeLists::params_unchanged_in(size_t begin, size_t end) const {
  const Kept& kept = *kept_;
  // One level of the chain per pass over all of them, prefetching the next: the misses of a
  // pass overlap as far as the core allows. (Unlike the scan, which has more to do per tensor
  // and works in blocks, a pass here does nothing else for the core to overlap with.)
  for (size_t i = begin; i < end; ++i) {
    prefetch_python_tensor(params_[i].ptr());
  }
  for (size_t i = begin; i < end; ++i) {
    prefetch_impl(THPVariable_Unpack(params_[i].ptr()).unsafeGetTensorImpl());
  }
  for (size_t i = begin; i < end; ++i) {
    prefetch_storage(THPVariable_Unpack(params_[i].ptr()).unsafeGetTensorImpl());
  }
  for (size_t i = begin; i < end; ++i) {
    if (!same_tensor(
            THPVariable_Unpack(params_[i].ptr()), kept.impls[i], kept.lists.params[i], kept.lists.dtypes[i], device_,
            kept.geometry[i], counter_address(kept.param_versions[i]))) {
      return false;
    }
  }
  return true;
}

}  // namespace fsam_fused::host
