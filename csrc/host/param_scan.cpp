#include "param_scan.h"

#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>

namespace py = pybind11;

namespace fsam_fused::host {

bool Geometry::matches(const at::Tensor& t) const {
  return t.sizes().equals(sizes) && t.strides().equals(strides);
}

void Geometry::record(const at::Tensor& t) {
  sizes.assign(t.sizes().begin(), t.sizes().end());
  strides.assign(t.strides().begin(), t.strides().end());
}

namespace {
std::atomic<uint64_t> next_scan_id{1};
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

// Records the parameter's and its gradient's current state in `entry`; true if it differs
// from what was recorded before.
bool ParamScan::observe(Entry& entry) {
  const at::Tensor& p = THPVariable_Unpack(entry.object.ptr());
  bool changed = false;
  const void* data = p.unsafeGetTensorImpl()->data();
  if (p.unsafeGetTensorImpl() != entry.impl || data != entry.data || p.scalar_type() != entry.dtype ||
      p.device() != entry.device || !entry.geometry.matches(p)) {
    changed = true;
    entry.impl = p.unsafeGetTensorImpl();
    entry.data = data;
    entry.dtype = p.scalar_type();
    entry.device = p.device();
    entry.geometry.record(p);
  }
  const at::Tensor& g = p.grad();
  if (g.defined() != entry.has_grad) {
    changed = true;
    entry.has_grad = g.defined();
  }
  if (!g.defined()) {
    entry.grad = at::Tensor();
    return changed;
  }
  if (g.layout() != entry.grad_layout) {
    changed = true;
    entry.grad_layout = g.layout();
  }
  if (g.layout() != c10::kStrided) {
    entry.grad = g;  // the optimizer rejects it with a message when it re-plans
    return changed;
  }
  if (g.scalar_type() != entry.grad_dtype || g.device() != entry.grad_device || !entry.grad_geometry.matches(g)) {
    changed = true;
    entry.grad_dtype = g.scalar_type();
    entry.grad_device = g.device();
    entry.grad_geometry.record(g);
  }
  // The kernels walk a parameter and its gradient in the same memory order.
  if (g.numel() > 1 && !g.strides().equals(p.strides())) {
    entry.grad = at::empty_like(p).copy_(g);
  } else {
    entry.grad = g;
  }
  return changed;
}

bool ParamScan::scan(const py::list& param_lists) {
  bool changed = generation_ == 0 || !same_members(param_lists);
  for (Entry& entry : entries_) {
    changed |= observe(entry);
  }
  for (Watched& w : watched_) {
    const void* data = THPVariable_Unpack(w.object.ptr()).unsafeGetTensorImpl()->data();
    changed |= data != w.data;
    w.data = data;
  }
  if (changed) {
    ++generation_;
  }
  return changed;
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
  for (Entry& entry : entries_) {
    entry.grad = at::Tensor();
  }
}

void zero_grads(const py::list& param_lists) {
  for (const py::handle params : param_lists) {
    for (const py::handle p : py::reinterpret_borrow<py::list>(params)) {
      TORCH_CHECK(THPVariable_Check(p.ptr()), "zero_grads: parameters must be tensors");
      const at::Tensor& param = THPVariable_Unpack(p.ptr());
      if (param.grad().defined()) {
        param.mutable_grad().reset();
      }
    }
  }
}

}  // namespace fsam_fused::host
