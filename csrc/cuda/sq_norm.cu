// fsam_fused::sq_norm on CUDA: per-chunk partial sums, then one block adds the partials
// in a fixed order (in double), so the result does not depend on scheduling.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../fsam_math.h"
#include "../tensor_lists.h"
#include "multi_tensor_launch.cuh"

namespace fsam_fused::cuda {
namespace {

enum List { kParams, kGrads, kMomentum, kDepth };

template <typename T, bool HasMomentum, typename Table>
__global__ void __launch_bounds__(kThreads)
    chunk_sq_norm_kernel(const Table table, const float* coef, const float* inv_scale, float* partials) {
  const BlockChunk<Table> chunk(table);
  const T* p = chunk.template data<const T>(table, kParams);
  const T* g = chunk.template data<const T>(table, kGrads);
  const float* m = chunk.template data<const float>(table, kMomentum);
  const TensorCoef c = read_coef(coef, table.position[chunk.slot]);
  const float unscale = inv_scale == nullptr ? 1.0f : *inv_scale;
  const bool vectorized = is_aligned16(p) && is_aligned16(g) && is_aligned16(m);

  float acc = 0.0f;
  walk_chunk<kVecWidth<T>>(chunk.n, vectorized, [&](int i, auto width) {
    constexpr int W = decltype(width)::value;
    alignas(16) T pv[W];
    alignas(16) T gv[W];
    alignas(16) float mv[W];
    load<W>(g + i, gv);
    if (c.t.adaptive) {
      load<W>(p + i, pv);
    }
    if constexpr (HasMomentum) {
      load<W>(m + i, mv);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float grad = static_cast<float>(gv[k]) * unscale;
      const float d = direction(grad, HasMomentum ? mv[k] : 0.0f, c.sigma);
      acc += norm_term(c.t.adaptive ? static_cast<float>(pv[k]) : 0.0f, grad, d, c.t);
    }
  });
  const float block = block_sum(acc);
  if (threadIdx.x == 0) {
    partials[table.first_block + blockIdx.x] = block;
  }
}

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* partials, int64_t n, float* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    acc += partials[i];
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) {
    *out = static_cast<float>(total);
  }
}

at::Tensor sq_norm(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    const at::Tensor& coef,
    const std::optional<at::Tensor>& inv_scale) {
  check_sq_norm_args(params, grads, momentum, coef, inv_scale);
  const c10::cuda::CUDAGuard guard(coef.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* unscale = inv_scale.has_value() ? inv_scale->data_ptr<float>() : nullptr;
  std::vector<int64_t> all(params.size());
  for (size_t i = 0; i < all.size(); ++i) {
    all[i] = static_cast<int64_t>(i);
  }
  const at::Tensor partials = at::empty({count_blocks(params, all)}, coef.options());
  int64_t next_block = 0;
  for (const auto& [dtype, positions] : positions_by_dtype(params)) {
    dispatch_param_dtype(dtype, [&](auto type_tag) {
      using T = decltype(type_tag);
      dispatch_bool(!momentum.empty(), [&](auto with_m) {
        dispatch_table_capacity([&](auto capacity) {
          using Table = LaunchTable<kDepth, decltype(capacity)>;
          next_block = launch_over_chunks<kDepth, decltype(capacity)>(
              {params, grads, momentum}, positions, next_block, [&](const Table& table, int blocks) {
                chunk_sq_norm_kernel<T, decltype(with_m)::value, Table><<<blocks, kThreads, 0, stream>>>(
                    table, coef.data_ptr<float>(), unscale, partials.data_ptr<float>());
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
        });
      });
    });
  }
  at::Tensor out = at::empty({}, coef.options());
  sum_partials_kernel<<<1, kThreads, 0, stream>>>(partials.data_ptr<float>(), partials.numel(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_fused, CUDA, m) {
  m.impl("sq_norm", &sq_norm);
}

}  // namespace fsam_fused::cuda
