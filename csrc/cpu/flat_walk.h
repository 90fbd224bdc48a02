// Walking tensor lists on the CPU as one flat index space.
//
// The tensors of a list are laid end to end (in list order, each in its storage order);
// work is split into ranges of that index space, and a range is visited as pieces that
// each lie within one tensor. The index only costs one int64 per tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fsam_fused::cpu {

// Elements per parallel task of the elementwise ops: large enough to amortise the task,
// small enough to balance a few threads over a ResNet-sized model.
constexpr int64_t kElementwiseGrain = int64_t{1} << 15;

// starts[i] is the flat index of tensor i's first element; starts.back() the total.
inline std::vector<int64_t> flat_starts(at::TensorList tensors) {
  std::vector<int64_t> starts(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    starts[i + 1] = starts[i] + tensors[i].numel();
  }
  return starts;
}

// Calls f(i, lo, hi) for each non-empty piece [lo, hi) of tensor i within the flat range [begin, end).
template <typename F>
void for_each_piece(const std::vector<int64_t>& starts, int64_t begin, int64_t end, F&& f) {
  auto i = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
  while (begin < end) {
    const int64_t hi = std::min(end, starts[i + 1]);
    if (hi > begin) {
      f(i, begin - starts[i], hi - starts[i]);
    }
    begin = std::max(begin, hi);
    ++i;
  }
}

template <typename T>
T* data_at(const at::Tensor& t, int64_t offset) {
  return static_cast<T*>(t.data_ptr()) + offset;
}

}  // namespace fsam_fused::cpu
