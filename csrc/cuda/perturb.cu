// fsam_fused::perturb_ on CUDA: one pass per element writing backup, momentum and p. The
// scale is computed on the device from total_sq_norm, so nothing is read back.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../fsam_math.h"
#include "../tensor_lists.h"
#include "multi_tensor_launch.cuh"

namespace fsam_fused::cuda {
namespace {

enum List { kParams, kGrads, kBackup, kMomentum, kDepth };

template <typename T, bool HasMomentum, typename Table>
__global__ void __launch_bounds__(kThreads) perturb_kernel(
    const Table table,
    const float* coef,
    const float* total_sq_norm,
    float eps,
    const float* inv_scale) {
  const BlockChunk<Table> chunk(table);
  T* p = chunk.template data<T>(table, kParams);
  const T* g = chunk.template data<const T>(table, kGrads);
  T* backup = chunk.template data<T>(table, kBackup);
  float* m = chunk.template data<float>(table, kMomentum);
  const TensorCoef c = read_coef(coef, table.position[chunk.slot]);
  const float total = *total_sq_norm;
  // A non-finite norm makes the step a no-op for p and m; the backup is still taken so
  // that restore_ stays unconditional.
  const bool step_ok = isfinite(total);
  const float scale = step_scale(total, c.rho, eps);
  const float unscale = inv_scale == nullptr ? 1.0f : *inv_scale;
  const bool vectorized = is_aligned16(p) && is_aligned16(g) && is_aligned16(backup) && is_aligned16(m);

  walk_chunk<kVecWidth<T>>(chunk.n, vectorized, [&](int i, auto width) {
    constexpr int W = decltype(width)::value;
    alignas(16) T pv[W];
    load<W>(p + i, pv);
    store<W>(backup + i, pv);
    if (!step_ok) {
      return;
    }
    alignas(16) T gv[W];
    [[maybe_unused]] alignas(16) float mv[W];
    load<W>(g + i, gv);
    if constexpr (HasMomentum) {
      load<W>(m + i, mv);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float grad = static_cast<float>(gv[k]) * unscale;
      float d = grad;
      if constexpr (HasMomentum) {
        d = direction(grad, mv[k], c.sigma);
        mv[k] = ema(mv[k], grad, c.lmbda);
      }
      pv[k] = static_cast<T>(perturbed(static_cast<float>(pv[k]), grad, d, scale, c.t));
    }
    store<W>(p + i, pv);
    if constexpr (HasMomentum) {
      store<W>(m + i, mv);
    }
  });
}

void perturb_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    at::TensorList backup,
    const at::Tensor& coef,
    const at::Tensor& total_sq_norm,
    double eps,
    const std::optional<at::Tensor>& inv_scale) {
  check_perturb_args(params, grads, momentum, backup, coef, total_sq_norm, inv_scale);
  const c10::cuda::CUDAGuard guard(coef.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* unscale = inv_scale.has_value() ? inv_scale->data_ptr<float>() : nullptr;
  for (const auto& [dtype, positions] : positions_by_dtype(params)) {
    dispatch_param_dtype(dtype, [&](auto type_tag) {
      using T = decltype(type_tag);
      dispatch_bool(!momentum.empty(), [&](auto with_m) {
        dispatch_table_capacity([&](auto capacity) {
          using Table = LaunchTable<kDepth, decltype(capacity)>;
          launch_over_chunks<kDepth, decltype(capacity)>(
              {params, grads, backup, momentum}, positions, 0, [&](const Table& table, int blocks) {
                perturb_kernel<T, decltype(with_m)::value, Table><<<blocks, kThreads, 0, stream>>>(
                    table, coef.data_ptr<float>(), total_sq_norm.data_ptr<float>(), static_cast<float>(eps), unscale);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
        });
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_fused, CUDA, m) {
  m.impl("perturb_", &perturb_);
}

}  // namespace fsam_fused::cuda
