// A 0-d fp32 CPU tensor made without the dispatcher: for a host step's scalar results (a norm, a
// flag), where the dispatch of at::empty and fill_ would cost more than the value.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>

namespace fsam_fused::host {

inline at::Tensor cpu_scalar(float value) {
  at::Tensor out(at::detail::empty_cpu({}, c10::ScalarType::Float));
  *out.data_ptr<float>() = value;
  return out;
}

}  // namespace fsam_fused::host
