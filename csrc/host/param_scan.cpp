#include "param_scan.h"

#include "object_prefetch.h"
#include "parallel_tensors.h"

#include <ATen/ops/empty_like.h>
#include <c10/core/impl/COW.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <array>
#include <atomic>

namespace py = pybind11;

namespace fsam_fused::host {

void Geometry::record(const at::Tensor& t) {
  sizes.assign(t.sizes().begin(), t.sizes().end());
  strides.assign(t.strides().begin(), t.strides().end());
}

namespace {
std::atomic<uint64_t> next_scan_id{1};

const c10::TensorImpl* impl_of(PyObject* tensor) {
  return THPVariable_Unpack(tensor).unsafeGetTensorImpl();
}
}  // namespace

ParamScan::ParamScan(const py::list& param_lists) : id_(next_scan_id++) {
  for (const py::handle params : param_lists) {
    const py::list list = py::reinterpret_borrow<py::list>(params);
    group_sizes_.push_back(list.size());
    for (const py::handle p : list) {
      TORCH_CHECK(THPVariable_Check(p.ptr()), "ParamScan: parameters must be tensors");
      Entry entry;
      entry.object = py::reinterpret_borrow<py::object>(p);
      entries_.push_back(std::move(entry));
    }
  }
}

bool ParamScan::same_members(const py::list& param_lists) const {
  if (param_lists.size() != group_sizes_.size()) {
    return false;
  }
  size_t k = 0;
  for (size_t g = 0; g < group_sizes_.size(); ++g) {
    PyObject* list = PyList_GET_ITEM(param_lists.ptr(), g);
    if (!PyList_Check(list) || static_cast<size_t>(PyList_GET_SIZE(list)) != group_sizes_[g]) {
      return false;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i, ++k) {
      if (PyList_GET_ITEM(list, i) != entries_[k].object.ptr()) {
        return false;
      }
    }
  }
  return true;
}

bool ParamScan::observe(size_t i, bool& hold) {
  Entry& entry = entries_[i];
  const void*& address = grad_addresses_[i];
  const at::Tensor& p = THPVariable_Unpack(entry.object.ptr());
  bool changed = false;
  address = nullptr;
  if (!same_tensor(p, entry.impl, entry.data, entry.dtype, entry.device, entry.geometry, entry.version_counter)) {
    changed = true;
    const void* data = p.unsafeGetTensorImpl()->data();  // (first: it throws for a tensor without storage)
    entry.impl = p.unsafeGetTensorImpl();
    entry.data = data;
    entry.dtype = p.scalar_type();
    entry.device = p.device();
    entry.geometry.record(p);
    entry.version_counter = version_counter_address(entry.impl);
  }
  // (Through the TensorImpl: Tensor::grad() also asks autograd whether p is a leaf, to warn.)
  const at::Tensor& g = p.unsafeGetTensorImpl()->grad();
  if (g.defined() != entry.has_grad) {
    changed = true;
    entry.has_grad = g.defined();
  }
  if (!g.defined()) {
    entry.grad = at::Tensor();
    return changed;
  }
  if (g.unsafeGetTensorImpl()->is_python_dispatch()) {
    before_python(i, hold);  // its layout, sizes or data may be the subclass's Python code
  }
  if (g.layout() != entry.grad_layout) {
    changed = true;
    entry.grad_layout = g.layout();
  }
  if (g.layout() != c10::kStrided) {
    entry.grad = g;  // the optimizer rejects it with a message when it re-plans
    return changed;
  }
  if (!entry.grad_as_recorded(g)) {
    changed = true;
    entry.grad_dtype = g.scalar_type();
    entry.grad_device = g.device();
    entry.grad_geometry.record(g);
  }
  // The kernels walk a parameter and its gradient in the same memory order. (Both layouts are
  // as recorded unless something changed.)
  if (changed) {
    entry.grad_relaid = g.numel() > 1 && !g.strides().equals(p.strides());
  }
  if (entry.grad_relaid) {
    before_python(i, hold);  // the copy's dispatch may reach Python (a dispatch mode, a subclass)
    entry.grad = at::empty_like(p).copy_(g);
    address = entry.grad.data_ptr();
    return changed;
  }
  entry.grad = hold ? g : at::Tensor();
  address = g.data_ptr();
  return changed;
}

void ParamScan::before_python(size_t i, bool& hold) {
  python_may_have_run_ = true;
  if (hold) {
    return;
  }
  for (size_t k = 0; k < i; ++k) {
    Entry& entry = entries_[k];
    if (entry.has_grad && !entry.grad.defined()) {
      entry.grad = impl_of(entry.object.ptr())->grad();
    }
  }
  hold = true;
}

void ParamScan::prefetch(size_t begin, size_t end) const {
  std::array<const c10::TensorImpl*, kPrefetchBlock> impls{};
  for (size_t i = begin; i < end; ++i) {
    prefetch_python_tensor(entries_[i].object.ptr());
  }
  for (size_t i = begin; i < end; ++i) {
    impls[i - begin] = impl_of(entries_[i].object.ptr());
    prefetch_impl(impls[i - begin]);
  }
  for (size_t i = begin; i < end; ++i) {
    prefetch_storage(impls[i - begin]);
    prefetch_grad_slot(impls[i - begin]);
  }
  for (size_t i = begin; i < end; ++i) {
    impls[i - begin] = impls[i - begin]->grad().unsafeGetTensorImpl();
    prefetch_impl(impls[i - begin]);
  }
  for (size_t i = begin; i < end; ++i) {
    prefetch_storage(impls[i - begin]);
  }
}

bool ParamScan::unchanged_at(size_t i) {
  const Entry& entry = entries_[i];
  // No Python dispatch, so that its sizes and strides are its own fields, not a subclass's code;
  // same_tensor compares the TensorImpl with the recorded one (which passed observe's checks) first.
  const c10::TensorImpl* impl = impl_of(entry.object.ptr());
  if (impl->is_python_dispatch() ||
      !same_tensor(
          THPVariable_Unpack(entry.object.ptr()), entry.impl, entry.data, entry.dtype, entry.device, entry.geometry,
          entry.version_counter)) {
    return false;
  }
  const at::Tensor& g = impl->grad();
  if (g.defined() != entry.has_grad) {
    return false;
  }
  if (!g.defined()) {
    grad_addresses_[i] = nullptr;
    return true;
  }
  if (entry.grad_relaid || entry.grad_layout != c10::kStrided || g.unsafeGetTensorImpl()->is_python_dispatch() ||
      g.layout() != c10::kStrided || !entry.grad_as_recorded(g) || !g.unsafeGetTensorImpl()->has_storage() ||
      c10::impl::cow::is_cow_data_ptr(g.unsafeGetTensorImpl()->unsafe_storage().data_ptr())) {
    return false;  // (a lazy copy-on-write gradient: observe's data_ptr() materializes it, on the caller's thread)
  }
  grad_addresses_[i] = g.data_ptr();
  return true;
}

bool ParamScan::unchanged_in(size_t begin, size_t end) {
  try {
    for (size_t block = begin; block < end; block += kPrefetchBlock) {
      const size_t block_end = std::min(end, block + kPrefetchBlock);
      prefetch(block, block_end);
      for (size_t i = block; i < block_end; ++i) {
        if (!unchanged_at(i)) {
          return false;
        }
      }
    }
  } catch (...) {  // (a tensor whose data cannot be read: observe raises its error on the caller's thread)
    return false;
  }
  return true;
}

bool ParamScan::scan(const py::list& param_lists, bool hold) {
  bool changed = !finished_ || generation_ == 0 || !same_members(param_lists);
  grad_addresses_.resize(entries_.size());
  // The common step, in parallel: nothing changed, and no gradient is to be held (nor is one held
  // from before: dropping it is observe's, on this thread).
  const bool unchanged = !changed && !hold && !holds_grads_ &&
      all_chunks(entries_.size(), [this](size_t begin, size_t end) { return unchanged_in(begin, end); });
  finished_ = false;
  python_may_have_run_ = false;
  holds_grads_ = true;  // (until it is known: a scan that raises may have taken some)
  bool holds = false;
  entries_observed_ = unchanged ? 0 : entries_.size();
  for (size_t begin = 0; !unchanged && begin < entries_.size(); begin += kPrefetchBlock) {
    const size_t end = std::min(entries_.size(), begin + kPrefetchBlock);
    prefetch(begin, end);
    for (size_t i = begin; i < end; ++i) {
      changed |= observe(i, hold);
      holds |= entries_[i].grad.defined();
    }
  }
  for (const Watched& w : watched_) {
    prefetch_python_tensor(w.object.ptr());
  }
  for (const Watched& w : watched_) {
    prefetch_impl(impl_of(w.object.ptr()));
  }
  for (const Watched& w : watched_) {
    prefetch_storage(impl_of(w.object.ptr()));
  }
  for (Watched& w : watched_) {
    const void* data = impl_of(w.object.ptr())->data();
    changed |= data != w.data;
    w.data = data;
  }
  holds_grads_ = holds || python_may_have_run_;
  finished_ = true;
  released_ = false;
  if (changed) {
    ++generation_;
  }
  return changed;
}

bool ParamScan::saw(int64_t position, const at::Tensor& t) const {
  const Entry& entry = entries_.at(position);
  return same_tensor(t, entry.impl, entry.data, entry.dtype, entry.device, entry.geometry, entry.version_counter);
}

std::vector<std::optional<at::Tensor>> ParamScan::grads(const std::vector<int64_t>& positions) const {
  std::vector<std::optional<at::Tensor>> out;
  out.reserve(positions.size());
  for (int64_t pos : positions) {
    TORCH_CHECK(pos >= 0 && pos < static_cast<int64_t>(entries_.size()), "ParamScan: position out of range");
    const at::Tensor& g = entries_[pos].grad;
    out.push_back(g.defined() ? std::optional<at::Tensor>(g) : std::nullopt);
  }
  return out;
}

std::vector<int64_t> ParamScan::grad_addresses_at(const std::vector<int64_t>& positions) const {
  TORCH_CHECK(finished_ && !released_, "ParamScan.grad_addresses: no finished scan since the last release()");
  std::vector<int64_t> out;
  out.reserve(positions.size());
  for (int64_t pos : positions) {
    TORCH_CHECK(pos >= 0 && pos < static_cast<int64_t>(grad_addresses_.size()), "ParamScan: position out of range");
    out.push_back(reinterpret_cast<int64_t>(grad_addresses_[pos]));
  }
  return out;
}

const at::Tensor& ParamScan::grad(int64_t position) const {
  const at::Tensor& g = entries_.at(position).grad;
  TORCH_INTERNAL_ASSERT(g.defined(), "ParamScan: a plan's parameter has no gradient this step");
  return g;
}

void ParamScan::watch(const py::list& tensors) {
  watched_.clear();
  for (const py::handle t : tensors) {
    TORCH_CHECK(THPVariable_Check(t.ptr()), "ParamScan.watch: expected tensors");
    watched_.push_back({py::reinterpret_borrow<py::object>(t), THPVariable_Unpack(t.ptr()).unsafeGetTensorImpl()->data()});
  }
}

void ParamScan::release() {
  if (holds_grads_) {
    for (Entry& entry : entries_) {
      entry.grad = at::Tensor();
    }
    holds_grads_ = false;
  }
  std::fill(grad_addresses_.begin(), grad_addresses_.end(), nullptr);
  released_ = true;
}

void zero_grads(const py::list& param_lists) {
  for (const py::handle params : param_lists) {
    for (const py::handle p : py::reinterpret_borrow<py::list>(params)) {
      TORCH_CHECK(THPVariable_Check(p.ptr()), "zero_grads: parameters must be tensors");
      const at::Tensor& param = THPVariable_Unpack(p.ptr());
      if (param.unsafeGetTensorImpl()->grad().defined()) {
        param.mutable_grad().reset();
      }
    }
  }
}

}  // namespace fsam_fused::host
