// fsam_fused::restore_ on the CPU: p <- backup, a byte copy in storage order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../tensor_lists.h"
#include "flat_walk.h"

namespace fsam_fused::cpu {
namespace {

void restore_(at::TensorList params, at::TensorList backup) {
  check_restore_lists("restore_", params, backup);
  const std::vector<int64_t> starts = flat_starts(params);
  at::parallel_for(0, starts.back(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for_each_piece(starts, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
      const size_t elem = params[i].element_size();
      std::memcpy(
          static_cast<char*>(params[i].data_ptr()) + lo * elem,
          static_cast<const char*>(backup[i].data_ptr()) + lo * elem,
          (hi - lo) * elem);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_fused, CPU, m) {
  m.impl("restore_", &restore_);
}

}  // namespace fsam_fused::cpu
