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
  restore_flat(FlatLists::of(params, {}, {}, backup));
}

}  // namespace

void restore_flat(const FlatLists& lists) {
  at::parallel_for(0, lists.starts.back(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for_each_piece(lists.starts, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
      lists.prefetch(i + kPrefetchAhead);
      const size_t elem = c10::elementSize(lists.dtypes[i]);
      std::memcpy(lists.params[i] + lo * elem, lists.backup[i] + lo * elem, (hi - lo) * elem);
    });
  });
}

TORCH_LIBRARY_IMPL(fsam_fused, CPU, m) {
  m.impl("restore_", &restore_);
}

}  // namespace fsam_fused::cpu
