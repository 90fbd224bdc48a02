#include "tensor_lists.h"

#include "fsam_math.h"

namespace fsam_fused {
namespace {

thread_local bool lists_prechecked = false;

bool is_supported(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// A tensor of at most one element has no meaningful layout, so its strides may differ.
void check_same_layout(const char* op, const char* arg, size_t i, const at::Tensor& t, const at::Tensor& p) {
  TORCH_CHECK(
      t.sizes() == p.sizes(), op, ": ", arg, "[", i, "] has shape ", t.sizes(), " but params[", i,
      "] has shape ", p.sizes(), "; pass tensors shaped like the parameters");
  TORCH_CHECK(
      p.numel() <= 1 || t.strides() == p.strides(), op, ": ", arg, "[", i, "] has strides ", t.strides(),
      " but params[", i, "] has strides ", p.strides(), "; lay it out like the parameter (e.g. torch.empty_like)");
  TORCH_CHECK(
      t.device() == p.device(), op, ": ", arg, "[", i, "] is on ", t.device(), " but params[", i, "] is on ",
      p.device());
}

void check_param(const char* op, size_t i, const at::Tensor& p) {
  TORCH_CHECK(
      is_supported(p.scalar_type()), op, ": params[", i, "] has dtype ", p.scalar_type(),
      "; the native ops take float32, bfloat16 and float16 (use backend='torch' for others)");
  TORCH_CHECK(
      p.is_non_overlapping_and_dense(), op, ": params[", i, "] with strides ", p.strides(),
      " is not dense; pass dense tensors (contiguous or channels_last)");
}

void check_backup(const char* op, size_t i, const at::Tensor& b, const at::Tensor& p) {
  check_same_layout(op, "backup", i, b, p);
  TORCH_CHECK(
      b.scalar_type() == p.scalar_type(), op, ": backup[", i, "] has dtype ", b.scalar_type(), " but params[", i,
      "] has ", p.scalar_type());
}

}  // namespace

PrecheckedLists::PrecheckedLists(bool prechecked) : previous_(lists_prechecked) {
  lists_prechecked = prechecked;
}

PrecheckedLists::~PrecheckedLists() {
  lists_prechecked = previous_;
}

void check_restore_lists(const char* op, at::TensorList params, at::TensorList backup) {
  TORCH_CHECK(
      backup.size() == params.size(), op, ": backup has ", backup.size(), " tensors, params has ", params.size());
  if (lists_prechecked) {
    return;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(op, i, params[i]);
    check_backup(op, i, backup[i], params[i]);
    // One launch covers the list, on params[0]'s device.
    TORCH_CHECK(
        params[i].device() == params[0].device(), op, ": params[", i, "] is on ", params[i].device(),
        " but params[0] is on ", params[0].device(), "; pass the tensors of one device");
  }
}

void check_lists(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    at::TensorList backup,
    const at::Tensor& coef) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": grads has ", grads.size(), " tensors, params has ", n);
  TORCH_CHECK(
      momentum.empty() || momentum.size() == n, op, ": momentum has ", momentum.size(),
      " tensors; pass one per parameter, or an empty list for no momentum");
  TORCH_CHECK(backup.empty() || backup.size() == n, op, ": backup has ", backup.size(), " tensors, params has ", n);
  check_coef(op, coef, n);
  if (lists_prechecked) {
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param(op, i, p);
    TORCH_CHECK(p.device() == coef.device(), op, ": params[", i, "] is on ", p.device(), ", coef on ", coef.device());
    check_same_layout(op, "grads", i, grads[i], p);
    TORCH_CHECK(
        grads[i].scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ", grads[i].scalar_type(),
        " but params[", i, "] has ", p.scalar_type());
    if (!momentum.empty()) {
      check_same_layout(op, "momentum", i, momentum[i], p);
      TORCH_CHECK(
          momentum[i].scalar_type() == at::kFloat, op, ": momentum[", i, "] must be float32, got ",
          momentum[i].scalar_type());
    }
    if (!backup.empty()) {
      check_backup(op, i, backup[i], p);
    }
  }
}

void check_coef(const char* op, const at::Tensor& coef, size_t n) {
  TORCH_CHECK(
      coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.size(0) == static_cast<int64_t>(n) &&
          coef.size(1) == kCoefColumns && coef.is_contiguous(),
      op, ": coef must be a contiguous float32 tensor of shape [", n, ", ", kCoefColumns,
      "] (rho, sigma, lmbda, adaptive, adaptive_eta, fisher_eta per parameter), got ", coef.scalar_type(), " ",
      coef.sizes());
}

void check_scalar(const char* op, const char* arg, const at::Tensor& t, at::TensorList params) {
  check_scalar(op, arg, t, params.empty() ? t.device() : params[0].device());
}

void check_scalar(const char* op, const char* arg, const at::Tensor& t, c10::Device device) {
  TORCH_CHECK(
      t.scalar_type() == at::kFloat && t.numel() == 1, op, ": ", arg,
      " must be a float32 tensor with one element, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", arg, " is on ", t.device(), " but the params are on ", device);
}

std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> positions_by_dtype(at::TensorList params) {
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const at::ScalarType dtype = params[i].scalar_type();
    auto it = groups.begin();
    while (it != groups.end() && it->first != dtype) {
      ++it;
    }
    if (it == groups.end()) {
      groups.emplace_back(dtype, std::vector<int64_t>{});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }
  return groups;
}

void check_sq_norm_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    const at::Tensor& coef,
    const std::optional<at::Tensor>& inv_scale) {
  check_lists("sq_norm", params, grads, momentum, {}, coef);
  if (inv_scale.has_value()) {
    check_scalar("sq_norm", "inv_scale", *inv_scale, params);
  }
}

void check_perturb_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    at::TensorList backup,
    const at::Tensor& coef,
    const at::Tensor& total_sq_norm,
    const std::optional<at::Tensor>& inv_scale) {
  check_lists("perturb_", params, grads, momentum, backup, coef);
  TORCH_CHECK(backup.size() == params.size(), "perturb_: backup has ", backup.size(), " tensors, params has ", params.size());
  check_scalar("perturb_", "total_sq_norm", total_sq_norm, params);
  if (inv_scale.has_value()) {
    check_scalar("perturb_", "inv_scale", *inv_scale, params);
  }
}

}  // namespace fsam_fused
