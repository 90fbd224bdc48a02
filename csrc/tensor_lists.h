// Argument checks and dtype dispatch shared by the CPU and CUDA implementations.
//
// Every op walks tensor lists as flat memory in storage order: position i of each list
// describes one parameter, and all lists share that parameter's strides (contiguous,
// channels_last or any other dense layout), so the same flat index addresses the same
// element everywhere.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace fsam_fused {

// Within a PrecheckedLists scope on this thread, the ops skip the per-tensor checks of their
// lists (sizes, strides, dtypes, devices), keeping only the O(1) ones. Set by a caller that
// ran the same lists through the full checks before and knows nothing about them changed
// since (fsam_fused::host::NativeLists, on a step whose scan saw no change).
class PrecheckedLists {
 public:
  explicit PrecheckedLists(bool prechecked);
  ~PrecheckedLists();
  PrecheckedLists(const PrecheckedLists&) = delete;
  PrecheckedLists& operator=(const PrecheckedLists&) = delete;

 private:
  bool previous_;
};

// Checks the lists of one op call. `momentum` and `backup` may be empty when the op
// does not take them (momentum: SAM keeps none; backup: sq_norm does not read it).
void check_lists(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    at::TensorList backup,
    const at::Tensor& coef);

// Checks the lists of restore_: one backup per parameter, laid out like it.
void check_restore_lists(const char* op, at::TensorList params, at::TensorList backup);

// Checks the per-tensor coefficient table of a call over n tensors.
void check_coef(const char* op, const at::Tensor& coef, size_t n);

// Checks an fp32 one-element tensor argument on the params' device (or on `device`).
void check_scalar(const char* op, const char* arg, const at::Tensor& t, at::TensorList params);
void check_scalar(const char* op, const char* arg, const at::Tensor& t, c10::Device device);

// All argument checks of sq_norm and of perturb_, shared by the CPU and CUDA implementations.
void check_sq_norm_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    const at::Tensor& coef,
    const std::optional<at::Tensor>& inv_scale);
void check_perturb_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    at::TensorList backup,
    const at::Tensor& coef,
    const at::Tensor& total_sq_norm,
    const std::optional<at::Tensor>& inv_scale);

// The positions of `params` holding each supported dtype, in list order: kernels are
// instantiated per dtype, so a list with mixed dtypes runs one pass per dtype.
std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> positions_by_dtype(at::TensorList params);

// Calls f(T{}) with T the C++ type of a supported parameter dtype.
template <typename F>
decltype(auto) dispatch_param_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "fsam_fused: unsupported parameter dtype ", dtype);
  }
}

// Calls f(std::true_type{}) or f(std::false_type{}): turns a flag that is fixed for a whole
// loop into a template parameter, so the loop body has no branch and no unneeded load.
template <typename F>
decltype(auto) dispatch_bool(bool flag, F&& f) {
  if (flag) {
    return f(std::true_type{});
  }
  return f(std::false_type{});
}

// dispatch_bool over several flags: calls f(std::bool_constant<flags>{}...).
template <typename F>
decltype(auto) dispatch_bools(F&& f) {
  return f();
}

template <typename F, typename... Flags>
decltype(auto) dispatch_bools(F&& f, bool first, Flags... rest) {
  return dispatch_bool(first, [&](auto head) {
    return dispatch_bools([&](auto... tail) { return f(head, tail...); }, rest...);
  });
}

}  // namespace fsam_fused
