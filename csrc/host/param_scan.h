// The per-step look at an optimizer's parameters, in one loop (fsam_fused/scan.py has the
// contract and the Python twin): which parameters have a gradient, and whether anything the
// step's plans depend on changed since the previous scan (group membership, a parameter's
// storage, dtype, device, shape or strides, the set of gradients, a gradient's layout).
// Gradients are read through the C++ tensor API, so no Python object is made for them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <vector>

#include "../prefetch.h"
#include "object_prefetch.h"

namespace fsam_fused::host {

// Shape and strides, compared at every scan.
struct Geometry {
  c10::SmallVector<int64_t, 6> sizes;
  c10::SmallVector<int64_t, 6> strides;

  bool matches(const at::Tensor& t) const {
    return same_values(t.sizes(), sizes) && same_values(t.strides(), strides);
  }
  void record(const at::Tensor& t);

 private:
  // Element by element: these are a handful of values, and a memcmp call costs more than comparing them.
  static bool same_values(c10::IntArrayRef now, const c10::SmallVector<int64_t, 6>& recorded) {
    if (now.size() != recorded.size()) {
      return false;
    }
    for (size_t i = 0; i < now.size(); ++i) {
      if (now[i] != recorded[i]) {
        return false;
      }
    }
    return true;
  }
};

// Whether `t` is still the tensor recorded as (impl, data, dtype, device, geometry, counter): the
// same TensorImpl, data address, dtype, device, shape, strides and version counter (the one a
// write to it bumps: NativeLists bumps the counters it kept, not through the parameters). The one
// test of "unchanged" for a parameter, whether the scan's entry or a kept list recorded it.
inline bool same_tensor(
    const at::Tensor& t,
    const c10::TensorImpl* impl,
    const void* data,
    c10::ScalarType dtype,
    c10::Device device,
    const Geometry& geometry,
    const void* counter) {
  const c10::TensorImpl* now = t.unsafeGetTensorImpl();
  return now == impl && now->data() == data && t.scalar_type() == dtype && t.device() == device &&
      geometry.matches(t) && version_counter_address(now) == counter;
}

// Most of a step's host time over many small tensors is waiting for memory: each parameter is a
// chain of dependent loads (its Python object, TensorImpl, storage, autograd metadata, the
// gradient's TensorImpl and storage), and one chain at a time leaves the core idle. Loops over
// them first walk a block of kPrefetchBlock tensors one pointer level per pass, prefetching the
// next level, so the block's misses overlap; the work on the block then finds them in cache.
constexpr size_t kPrefetchBlock = 32;

class ParamScan {
 public:
  // `param_lists`: each param group's list of parameters (plain tensors).
  explicit ParamScan(const pybind11::list& param_lists);

  // Reads every parameter's .grad; true when membership, a parameter, the set of gradients or
  // a gradient's layout differs from the previous call (always true on the first call).
  // With `hold`, the scan holds a reference to each gradient until release(), for grads();
  // without, it keeps only their addresses (grad_addresses()), for a caller that uses them
  // before it releases the GIL, and that re-plans (with a new scan) when this returns true. (A
  // gradient copied into its parameter's layout is held either way: the copy is the scan's own.)
  // A scan that raised (a failed copy, a gradient's own code) counts as a change next time:
  // the entries it updated before it raised were counted by no generation.
  bool scan(const pybind11::list& param_lists, bool hold = true);

  // Whether Python may have run during the last scan (a gradient subclass's code, the dispatch
  // of a gradient's copy), and with it other threads: the parameters read before then may have
  // been re-pointed since. From that point on the scan held every gradient, `hold` or not.
  bool python_may_have_run() const {
    return python_may_have_run_;
  }

  // Whether `t` is what the last scan saw at `position`: the same TensorImpl, data, dtype,
  // device, shape, strides and version counter.
  bool saw(int64_t position, const at::Tensor& t) const;

  // This step's gradients (laid out like their parameters) at `positions`; nullopt where none.
  std::vector<std::optional<at::Tensor>> grads(const std::vector<int64_t>& positions) const;

  // The addresses the last scan recorded for the gradients at `positions`: the gradient's data,
  // or the scan's copy of it in its parameter's layout; 0 where there is none or it is not
  // strided. For a caller that needs only where they are, without a tensor object per gradient;
  // raises after release() or a scan that raised. (Signed, as the int64 tables that hold them:
  // the same values as Python's data_ptr() for user-space addresses, below 2^63.)
  std::vector<int64_t> grad_addresses_at(const std::vector<int64_t>& positions) const;

  // The gradient of the parameter at `position`, which must have one.
  const at::Tensor& grad(int64_t position) const;

  // The address of each position's gradient this step (nullptr where none), in one array, so
  // a caller that keeps its own table of the other addresses reads nothing else per tensor.
  const std::vector<const void*>& grad_addresses() const {
    return grad_addresses_;
  }

  // Drops the references to this step's gradients.
  void release();

  // Tensors (the momentum that optimizer.state hands out) whose storage later scans also
  // compare: `.data = t` on one is a change, so the optimizer re-plans and adopts it.
  void watch(const pybind11::list& tensors);

  // How many entries the last scan ran its full check (observe) on: none where the step was
  // unchanged and the shared read-only loop (unchanged_in) served, all where anything differed.
  size_t entries_observed() const {
    return entries_observed_;
  }

  // Identifies what the last scan saw: the same (id, generation) means nothing changed since.
  uint64_t id() const {
    return id_;
  }
  uint64_t generation() const {
    return generation_;
  }

 private:
  struct Entry {
    // The Python parameter: membership is checked by identity. Only the Python object is held,
    // never its C++ tensor: torch.utils.swap_tensors (nn.Module._apply with
    // swap_module_params_on_conversion, load_state_dict(assign=True) of wrapper subclasses)
    // refuses a parameter whose TensorImpl has other owners, and replaces the TensorImpl
    // behind the same Python object, which the scan must then see as a change.
    pybind11::object object;
    const c10::TensorImpl* impl = nullptr;
    const void* data = nullptr;
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    c10::Device device = c10::Device(c10::DeviceType::CPU);
    Geometry geometry;
    const void* version_counter = nullptr;
    bool has_grad = false;
    c10::Layout grad_layout = c10::kStrided;
    c10::ScalarType grad_dtype = c10::ScalarType::Undefined;
    c10::Device grad_device = c10::Device(c10::DeviceType::CPU);
    Geometry grad_geometry;
    bool grad_relaid = false;  // copied into the parameter's layout (other strides)
    // Whether strided `g` has the dtype, device, shape and strides recorded for the gradient.
    bool grad_as_recorded(const at::Tensor& g) const {
      return g.scalar_type() == grad_dtype && g.device() == grad_device && grad_geometry.matches(g);
    }
    at::Tensor grad;  // held from scan() to release() (see scan's `hold`)
  };

  bool same_members(const pybind11::list& param_lists) const;
  void prefetch(size_t begin, size_t end) const;
  // The scan of a step where nothing changed, shared with a helper thread (parallel_tensors.h): true
  // if every entry in [begin, end) is as recorded and needs nothing observe does beyond reading
  // (no copy, no Python, no reference held), with each gradient's address written. Reads only,
  // so where it returns false the full loop of observe runs instead, over every entry.
  bool unchanged_in(size_t begin, size_t end);
  bool unchanged_at(size_t i);
  // Records the state of the parameter at `i` and its gradient in its entry and the gradient's
  // address (or nullptr) in grad_addresses_[i]; true if either differs from what was recorded.
  bool observe(size_t i, bool& hold);
  // Before anything that may run Python (python_may_have_run): unless `hold`, hold the gradients
  // of the entries before `i`, read with no Python run since, and every later one (`hold`).
  void before_python(size_t i, bool& hold);

  struct Watched {
    pybind11::object object;
    const void* data = nullptr;
  };

  std::vector<Watched> watched_;
  std::vector<size_t> group_sizes_;
  std::vector<Entry> entries_;
  std::vector<const void*> grad_addresses_;
  bool holds_grads_ = false;  // some entry's `grad` is defined (so release() has work)
  bool finished_ = true;  // false while a scan runs, and after one that raised
  bool released_ = true;  // no scan yet, or release() since the last
  bool python_may_have_run_ = false;
  size_t entries_observed_ = 0;
  uint64_t id_;
  uint64_t generation_ = 0;
};

// Sets the gradient of every parameter in `param_lists` (lists of tensors) to None, as
// `p.grad = None` does, in one loop.
void zero_grads(const pybind11::list& param_lists);

}  // namespace fsam_fused::host
