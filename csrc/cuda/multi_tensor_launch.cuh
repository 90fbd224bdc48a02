// Multi-tensor chunked launches, in the style of PyTorch's MultiTensorApply.cuh and apex's
// multi_tensor_apply: the tensors of a list are cut into chunks of kChunkSize elements,
// one thread block per chunk, and the addresses of up to kMaxTensorsPerLaunch tensors and
// kMaxBlocksPerLaunch chunks travel in the kernel's parameters. A whole model takes one
// launch, or a few for very large ones; nothing is copied to the device beforehand, so a
// launch is safe to capture in a CUDA graph as long as the tensors keep their addresses.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fsam_fused::cuda {

constexpr int kThreads = 512;
constexpr int64_t kChunkSize = 32768;
// Kernel parameters may take up to 32764 bytes since CUDA 12.1 on Volta and later (every
// target we build for); a Depth-4 table is about 8 KiB.
constexpr int kMaxTensorsPerLaunch = 64;
constexpr int kMaxBlocksPerLaunch = 1024;

template <int Depth>
struct LaunchTable {
  static_assert(kMaxTensorsPerLaunch <= 256, "block_tensor is a uint8_t index");
  void* addr[Depth][kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  // The tensor's position in the op's lists: its row of the coefficient table.
  int32_t position[kMaxTensorsPerLaunch];
  uint8_t block_tensor[kMaxBlocksPerLaunch];
  int32_t block_chunk[kMaxBlocksPerLaunch];
  // The op-wide index of this launch's first block (where its norm partials go).
  int64_t first_block;
};
static_assert(sizeof(LaunchTable<4>) <= 32764, "kernel parameters are limited to 32764 bytes");

inline int64_t chunks_of(int64_t numel) {
  return (numel + kChunkSize - 1) / kChunkSize;
}

// Number of blocks (chunks) the tensors at `positions` of `list` take.
inline int64_t count_blocks(at::TensorList list, const std::vector<int64_t>& positions) {
  int64_t blocks = 0;
  for (int64_t pos : positions) {
    blocks += chunks_of(list[pos].numel());
  }
  return blocks;
}

// Calls launch(table, blocks) for consecutive batches of the chunks of the tensors at
// `positions` (same position in every list; an empty list gives null addresses). Block
// indices start at `first_block`; returns the index after the last block.
template <int Depth, typename Launch>
int64_t launch_over_chunks(
    const std::array<at::TensorList, Depth>& lists,
    const std::vector<int64_t>& positions,
    int64_t first_block,
    Launch&& launch) {
  LaunchTable<Depth> table;
  table.first_block = first_block;
  int tensors = 0;
  int blocks = 0;
  auto flush = [&]() {
    if (blocks > 0) {
      launch(table, blocks);
    }
    table.first_block += blocks;
    tensors = 0;
    blocks = 0;
  };
  for (int64_t pos : positions) {
    const int64_t numel = lists[0][pos].numel();
    for (int64_t chunk = 0; chunk < chunks_of(numel); ++chunk) {
      if (tensors == 0 || table.position[tensors - 1] != pos) {
        if (tensors == kMaxTensorsPerLaunch) {
          flush();
        }
        for (int d = 0; d < Depth; ++d) {
          table.addr[d][tensors] = lists[d].empty() ? nullptr : lists[d][pos].data_ptr();
        }
        table.numel[tensors] = numel;
        table.position[tensors] = static_cast<int32_t>(pos);
        ++tensors;
      }
      table.block_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      table.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      if (blocks == kMaxBlocksPerLaunch) {
        flush();
      }
    }
  }
  flush();
  return table.first_block;
}

// The chunk this block works on.
template <int Depth>
struct BlockChunk {
  int slot;       // index into the table's per-tensor arrays
  int64_t start;  // first element of the chunk within its tensor
  int n;          // elements in the chunk

  __device__ explicit BlockChunk(const LaunchTable<Depth>& table)
      : slot(table.block_tensor[blockIdx.x]),
        start(static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunkSize),
        n(static_cast<int>(min(kChunkSize, table.numel[slot] - start))) {}

  template <typename T>
  __device__ T* data(const LaunchTable<Depth>& table, int d) const {
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
