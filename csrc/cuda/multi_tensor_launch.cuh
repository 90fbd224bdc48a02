// Multi-tensor chunked launches: the launch tables of launch_table.h filled from tensor
// lists and passed by value, so a whole model takes one launch, or a few for very large
// ones. Nothing is copied to the device beforehand, so a launch is safe to capture in a
// CUDA graph as long as the tensors keep their addresses.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../launch_table.h"

namespace fsam_fused::cuda {

constexpr int kThreads = 512;

// Number of blocks (chunks) the tensors at `positions` of `list` take.
inline int64_t count_blocks(at::TensorList list, const std::vector<int64_t>& positions) {
  int64_t blocks = 0;
  for (int64_t pos : positions) {
    blocks += chunks_of(list[pos].numel());
  }
  return blocks;
}

#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
// Whether a launch on the current device and stream may pass a LargeTable, as PyTorch's
// multi-tensor launches decide (its supports_large_kernel_arg): a driver of CUDA 12.1 or
// later (a build runs on older drivers of its major version) and a Volta or later GPU. Not
// while the stream is being captured into a CUDA graph, where some drivers fail on kernel
// nodes with more than 4 KB of parameters; the results do not depend on the table size.
inline bool large_tables_allowed() {
  static const bool driver_allows = [] {
    int version = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&version));
    return version >= 12010;
  }();
  return driver_allows && at::cuda::getCurrentDeviceProperties()->major >= 7 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}
#endif

// Calls f(LargeTable{}) or f(SmallTable{}), whichever the launch may use (a build with a
// CUDA older than 12.1 cannot compile kernels with large parameters at all).
template <typename F>
void dispatch_table_capacity(F&& f) {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  if (large_tables_allowed()) {
    f(LargeTable{});
    return;
  }
#endif
  f(SmallTable{});
}

// pack_launches over tensor lists: the tensors at `positions` (same position in every
// list; an empty list gives null addresses). Returns the index after the last block.
template <int Depth, typename Capacity, typename Launch>
int64_t launch_over_chunks(
    const std::array<at::TensorList, Depth>& lists,
    const std::vector<int64_t>& positions,
    int64_t first_block,
    Launch&& launch) {
  return pack_launches<Depth, Capacity>(
      positions,
      [&](int64_t pos) { return lists[0][pos].numel(); },
      [&](int d, int64_t pos) { return lists[d].empty() ? nullptr : lists[d][pos].data_ptr(); },
      first_block,
      launch);
}

// The chunk this block works on.
template <typename Table>
struct BlockChunk {
  int slot;       // index into the table's per-tensor arrays
  int64_t start;  // first element of the chunk within its tensor
  int n;          // elements in the chunk

  __device__ explicit BlockChunk(const Table& table)
      : slot(table.block_tensor[blockIdx.x]),
        start(static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunkSize),
        n(static_cast<int>(min(kChunkSize, table.numel[slot] - start))) {}

  template <typename T>
  __device__ T* data(const Table& table, int d) const {
    return table.addr[d][slot] == nullptr ? nullptr : static_cast<T*>(table.addr[d][slot]) + start;
  }
};

// Elements of T per 16-byte access.
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

__device__ inline bool is_aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <int Bytes>
struct alignas(16) Bytes16 {
  uint4 words[Bytes / 16];
};

// Loads (stores) W consecutive elements; W > 1 needs 16-byte aligned addresses (both the
// global one and the local array, declared alignas(16)) and
// W * sizeof(T) a multiple of 16, and then uses 16-byte accesses.
template <int W, typename T>
__device__ inline void load(const T* src, T (&dst)[W]) {
  if constexpr (W == 1) {
    dst[0] = *src;
  } else {
    static_assert(W * sizeof(T) % 16 == 0);
    *reinterpret_cast<Bytes16<W * sizeof(T)>*>(dst) = *reinterpret_cast<const Bytes16<W * sizeof(T)>*>(src);
  }
}

template <int W, typename T>
__device__ inline void store(T* dst, const T (&src)[W]) {
  if constexpr (W == 1) {
    *dst = src[0];
  } else {
    *reinterpret_cast<Bytes16<W * sizeof(T)>*>(dst) = *reinterpret_cast<const Bytes16<W * sizeof(T)>*>(src);
  }
}

// Calls body(i, width) for the elements [0, n) of a chunk, where width is an
// std::integral_constant: W-element groups when `vectorized` (all addresses 16-byte
// aligned), then single elements for the tail, or single elements throughout.
template <int W, typename Body>
__device__ inline void walk_chunk(int n, bool vectorized, Body&& body) {
  int tail = 0;
  if (vectorized) {
    for (int i = threadIdx.x * W; i + W <= n; i += blockDim.x * W) {
      body(i, std::integral_constant<int, W>{});
    }
    tail = n - n % W;
  }
  for (int i = tail + threadIdx.x; i < n; i += blockDim.x) {
    body(i, std::integral_constant<int, 1>{});
  }
}

// Sum over the block in a fixed order (warp shuffles, then one warp over the warp sums),
// so the same inputs give the same bits. The result is valid in thread 0.
template <typename Acc>
__device__ inline Acc block_sum(Acc value) {
  __shared__ Acc warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  value = lane < static_cast<int>(blockDim.x / 32) && warp == 0 ? warp_sums[lane] : Acc{0};
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

}  // namespace fsam_fused::cuda
