// fsam_fused::restore_ on CUDA: p <- backup, a bit-exact copy, multi-tensor.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tensor_lists.h"
#include "multi_tensor_launch.cuh"

namespace fsam_fused::cuda {
namespace {

enum List { kParams, kBackup, kDepth };

template <typename T, typename Table>
__global__ void __launch_bounds__(kThreads) restore_kernel(const Table table) {
  const BlockChunk<Table> chunk(table);
  T* p = chunk.template data<T>(table, kParams);
  const T* backup = chunk.template data<const T>(table, kBackup);
  walk_chunk<kVecWidth<T>>(chunk.n, is_aligned16(p) && is_aligned16(backup), [&](int i, auto width) {
    constexpr int W = decltype(width)::value;
    alignas(16) T v[W];
    load<W>(backup + i, v);
    store<W>(p + i, v);
  });
}

void restore_(at::TensorList params, at::TensorList backup) {
  check_restore_lists("restore_", params, backup);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, positions] : positions_by_dtype(params)) {
    dispatch_param_dtype(dtype, [&](auto type_tag) {
      using T = decltype(type_tag);
      dispatch_table_capacity([&](auto capacity) {
        using Table = LaunchTable<kDepth, decltype(capacity)>;
        launch_over_chunks<kDepth, decltype(capacity)>(
            {params, backup}, positions, 0, [&](const Table& table, int blocks) {
              restore_kernel<T, Table><<<blocks, kThreads, 0, stream>>>(table);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_fused, CUDA, m) {
  m.impl("restore_", &restore_);
}

}  // namespace fsam_fused::cuda
