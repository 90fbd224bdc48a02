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

#include "../prefetch.h"

namespace fsam_fused::cpu {

// Elements per parallel task of the elementwise ops: large enough to amortise the task,
// small enough to balance a few threads over a ResNet-sized model.
constexpr int64_t kElementwiseGrain = int64_t{1} << 15;

// How many tensors ahead the kernels prefetch data, and how much of each (FlatLists::prefetch).
constexpr size_t kPrefetchAhead = 8;
constexpr size_t kPrefetchBytes = 256;

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

// The lists of one op call as what the kernels read per tensor: element offsets, dtypes and
// base addresses. The op entry points gather it from their (checked) tensor lists at each
// call; fsam_fused::host::NativeLists keeps one between steps and only renews the gradients'
// addresses, so an unchanged step reads no tensor object after its scan.
struct FlatLists {
  std::vector<int64_t> starts;  // as flat_starts
  std::vector<at::ScalarType> dtypes;
  std::vector<char*> params;
  std::vector<const char*> grads;  // empty for restore_
  std::vector<float*> momentum;  // empty: no momentum (SAM)
  std::vector<char*> backup;  // empty for sq_norm

  // Prefetches the start of tensor i's data in each list (nothing past the end): over many
  // small tensors each is an allocation of its own, which no hardware prefetcher predicts, so
  // a kernel asks for the tensors kPrefetchAhead places ahead of the one it is working on.
  // Up to kPrefetchBytes of each: a larger tensor's stream is the hardware prefetcher's.
  void prefetch(size_t i) const {
    if (i >= params.size()) {
      return;
    }
    const int64_t elements = starts[i + 1] - starts[i];
    const size_t bytes = std::min<size_t>(kPrefetchBytes, elements * c10::elementSize(dtypes[i]));
    prefetch_bytes(params[i], bytes);
    if (!grads.empty()) {
      prefetch_bytes(grads[i], bytes);
    }
    if (!momentum.empty()) {
      prefetch_bytes(momentum[i], std::min<size_t>(kPrefetchBytes, elements * sizeof(float)));
    }
    if (!backup.empty()) {
      prefetch_bytes(backup[i], bytes);
    }
  }

  // Gathers the addresses of `params` and of each non-empty list beside it.
  static FlatLists of(at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList backup) {
    FlatLists lists;
    lists.starts = flat_starts(params);
    lists.dtypes.reserve(params.size());
    lists.params.reserve(params.size());
    for (const at::Tensor& p : params) {
      lists.dtypes.push_back(p.scalar_type());
      lists.params.push_back(static_cast<char*>(p.data_ptr()));
    }
    for (const at::Tensor& g : grads) {
      lists.grads.push_back(static_cast<const char*>(g.data_ptr()));
    }
    for (const at::Tensor& m : momentum) {
      lists.momentum.push_back(m.data_ptr<float>());
    }
    for (const at::Tensor& b : backup) {
      lists.backup.push_back(static_cast<char*>(b.data_ptr()));
    }
    return lists;
  }
};

// The CPU kernels over FlatLists (sq_norm.cpp, perturb.cpp, restore.cpp); the ops registered
// there check their arguments and call these. `coef` is the [n, kCoefColumns] table's data.
double sq_norm_flat(const FlatLists& lists, const float* coef, float inv_scale);
void perturb_flat(const FlatLists& lists, const float* coef, float total_sq_norm, float eps, float inv_scale);
void restore_flat(const FlatLists& lists);

}  // namespace fsam_fused::cpu
