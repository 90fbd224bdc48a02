#include "step_flags.h"

#include "cpu_scalar.h"

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace fsam_fused::host {

namespace {

// A contiguous CPU tensor of `dtype` with `dims` dimensions whose memory is what the ops would read
// and write: no Python behind it (a subclass), no wrapper over another tensor (functionalization,
// vmap), no pending negation or conjugation, no zero tensor without memory.
bool plain_cpu(const at::Tensor& t, c10::ScalarType dtype, int64_t dims) {
  if (!t.defined()) {
    return false;
  }
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  // First, so that nothing below calls into a subclass.
  static const c10::DispatchKeySet not_memory({
      c10::DispatchKey::Python,
      c10::DispatchKey::PythonTLSSnapshot,
      c10::DispatchKey::Functionalize,
      c10::DispatchKey::FuncTorchBatched,
      c10::DispatchKey::FuncTorchGradWrapper,
      c10::DispatchKey::Negative,
      c10::DispatchKey::Conjugate,
      c10::DispatchKey::ZeroTensor,
  });
  if (impl->key_set().has_any(not_memory) || !impl->has_storage()) {
    return false;
  }
  return t.device().is_cpu() && t.layout() == c10::kStrided && t.scalar_type() == dtype && t.dim() == dims &&
      t.is_contiguous();
}

bool loops_allowed() {
  return !c10::impl::dispatch_mode_enabled();
}

// torch.maximum: NaN if either is.
float maximum(float a, float b) {
  if (std::isnan(a)) {
    return a;
  }
  if (std::isnan(b)) {
    return b;
  }
  return a < b ? b : a;
}

// All indexes checked before anything is written, as the ops do.
void check_indexes(const char* op, const int64_t* index, int64_t n, int64_t bound) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(index[i] >= 0 && index[i] < bound, op, ": index ", index[i], " out of range [0, ", bound, ")");
  }
}

}  // namespace

bool gather_coef(
    const at::Tensor& coef,
    const at::Tensor& table,
    const at::Tensor& group_of,
    const at::Tensor& seeded,
    const at::Tensor& slots,
    int64_t lmbda_column,
    std::optional<int64_t> zero_column) {
  if (!loops_allowed() || !plain_cpu(coef, c10::ScalarType::Float, 2) || !plain_cpu(table, c10::ScalarType::Float, 2) ||
      !plain_cpu(group_of, c10::ScalarType::Long, 1) || !plain_cpu(seeded, c10::ScalarType::Float, 1) ||
      !plain_cpu(slots, c10::ScalarType::Long, 1)) {
    return false;
  }
  const int64_t n = coef.size(0);
  const int64_t columns = coef.size(1);
  const int64_t groups = table.size(0);
  const int64_t flags = seeded.size(0);
  TORCH_CHECK(
      table.size(1) == columns && group_of.size(0) == n && slots.size(0) == n,
      "gather_coef: coef [n, C], table [groups, C], group_of [n] and slots [n] must agree; got coef ",
      coef.sizes(), ", table ", table.sizes(), ", group_of ", group_of.sizes(), ", slots ", slots.sizes());
  TORCH_CHECK(lmbda_column >= 0 && lmbda_column < columns, "gather_coef: lmbda_column out of range");
  TORCH_CHECK(
      !zero_column.has_value() || (*zero_column >= 0 && *zero_column < columns),
      "gather_coef: zero_column out of range");
  float* out = coef.data_ptr<float>();
  const float* rows = table.data_ptr<float>();
  const int64_t* group = group_of.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const float* seed = seeded.data_ptr<float>();
  check_indexes("gather_coef", group, n, groups);
  check_indexes("gather_coef", slot, n, flags);
  for (int64_t i = 0; i < n; ++i) {
    float* row = out + i * columns;
    std::copy_n(rows + group[i] * columns, columns, row);
    row[lmbda_column] *= seed[slot[i]];
    if (zero_column.has_value()) {
      row[*zero_column] = 0.0f;
    }
  }
  torch::autograd::increment_version(coef);
  return true;
}

std::optional<std::pair<at::Tensor, at::Tensor>> finite_flags(const at::Tensor& total) {
  if (!loops_allowed() || !plain_cpu(total, c10::ScalarType::Float, 0)) {
    return std::nullopt;
  }
  const bool ok = std::isfinite(*total.data_ptr<float>());
  return std::make_pair(cpu_scalar(ok ? 1.0f : 0.0f), cpu_scalar(ok ? 0.0f : 1.0f));
}

bool mark_seeded(const at::Tensor& seeded, const at::Tensor& slots, const at::Tensor& step_ok) {
  if (!loops_allowed() || !plain_cpu(seeded, c10::ScalarType::Float, 1) || !plain_cpu(slots, c10::ScalarType::Long, 1) ||
      !plain_cpu(step_ok, c10::ScalarType::Float, 0)) {
    return false;
  }
  float* seed = seeded.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const float ok = *step_ok.data_ptr<float>();
  check_indexes("mark_seeded", slot, slots.size(0), seeded.size(0));
  for (int64_t i = 0; i < slots.size(0); ++i) {
    seed[slot[i]] = maximum(seed[slot[i]], ok);
  }
  torch::autograd::increment_version(seeded);
  return true;
}

bool add_flag(const at::Tensor& counter, const at::Tensor& flag) {
  if (!loops_allowed() || !plain_cpu(counter, c10::ScalarType::Float, 0) || !plain_cpu(flag, c10::ScalarType::Float, 0)) {
    return false;
  }
  *counter.data_ptr<float>() += *flag.data_ptr<float>();
  torch::autograd::increment_version(counter);
  return true;
}

}  // namespace fsam_fused::host
