// Prefetches of the objects behind a parameter, for the host loops over many tensors (the scan,
// the kept lists' checks, the version bumps): each names the fields those loops read, so that an
// object that straddles a cache-line boundary is fetched whole (see prefetch_bytes).
#pragma once

#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include "../prefetch.h"

namespace fsam_fused::host {

// The Python tensor's pointer to its C++ tensor.
inline void prefetch_python_tensor(PyObject* tensor) {
  const auto* variable = reinterpret_cast<const THPVariable*>(tensor);
  prefetch_bytes(&variable->cdata, sizeof(variable->cdata));
}

inline void prefetch_impl(const c10::TensorImpl* impl) {
  prefetch_bytes(impl, sizeof(c10::TensorImpl));
}

// The storage object that holds the data pointer (not the data).
inline void prefetch_storage(const c10::TensorImpl* impl) {
  if (impl->has_storage()) {  // (false for the undefined tensor's singleton)
    prefetch_bytes(impl->unsafe_storage().unsafeGetStorageImpl(), sizeof(c10::StorageImpl));
  }
}

// The autograd metadata's gradient slot. (Only its address is computed, never read: a prefetch
// of any address is harmless.)
inline void prefetch_grad_slot(const c10::TensorImpl* impl) {
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
  if (meta != nullptr) {
    prefetch_bytes(&meta->grad_, sizeof(meta->grad_));
  }
}

// The version counter that a write to a tensor bumps, which views share with their base:
// VariableVersion's one member is the pointer to it (null for inference tensors).
inline const void* counter_address(const c10::VariableVersion& version) {
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "VariableVersion is no longer one pointer");
  return *reinterpret_cast<const void* const*>(&version);
}

inline const void* version_counter_address(const c10::TensorImpl* impl) {
  return counter_address(impl->version_counter());
}

// (What the counter points to is 24 bytes: its vtable pointer, refcounts and the version.)
inline void prefetch_version_counter(const c10::VariableVersion& version) {
  const void* counter = counter_address(version);
  if (counter != nullptr) {
    prefetch_bytes(counter, 24);
  }
}

}  // namespace fsam_fused::host
