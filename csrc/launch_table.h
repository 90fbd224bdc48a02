// The launch tables of the CUDA multi-tensor kernels, and how the chunks of a tensor list
// are packed into them (in the style of PyTorch's MultiTensorApply.cuh and apex's
// multi_tensor_apply): the tensors are cut into chunks of kChunkSize elements, one thread
// block per chunk, and a table with the addresses of up to kMaxTensors tensors and the
// tensor and chunk of up to kMaxBlocks blocks travels in the kernel's parameters.
//
// Host code only, so the CPU build compiles it too and a test drives the packing through
// the `_pack_launch_tables` op (launch_table_probe.cpp) without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fsam_fused {

constexpr int64_t kChunkSize = 32768;

// Kernel parameters may take up to 32764 bytes with CUDA 12.1 or later, in the build and
// in the driver, on Volta and later GPUs; otherwise 4096 bytes. The CUDA launchers pick a
// table size at run time (multi_tensor_launch.cuh).
struct LargeTable {
  static constexpr int kTensors = 64;
  static constexpr int kBlocks = 1024;
  static constexpr size_t kParamBytes = 32764;
};
struct SmallTable {
  static constexpr int kTensors = 36;
  static constexpr int kBlocks = 320;
  static constexpr size_t kParamBytes = 4096;
};

// Room the kernels' other parameters (a few pointers and scalars) need beside the table.
constexpr size_t kOtherParamBytes = 64;

template <int Depth, typename Capacity>
struct LaunchTable {
  static constexpr int kMaxTensors = Capacity::kTensors;
  static constexpr int kMaxBlocks = Capacity::kBlocks;
  static_assert(kMaxTensors <= 256, "block_tensor is a uint8_t index");
  void* addr[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  // The tensor's position in the op's lists: its row of the coefficient table.
  int32_t position[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
  // The op-wide index of this launch's first block (where its norm partials go).
  int64_t first_block;
};

// The most lists a kernel reads (perturb_: params, grads, backup, momentum): every table
// that size fits the kernel parameters, checked here so the CPU build checks it too.
constexpr int kMaxDepth = 4;
static_assert(sizeof(LaunchTable<kMaxDepth, LargeTable>) + kOtherParamBytes <= LargeTable::kParamBytes);
static_assert(sizeof(LaunchTable<kMaxDepth, SmallTable>) + kOtherParamBytes <= SmallTable::kParamBytes);

inline int64_t chunks_of(int64_t numel) {
  return (numel + kChunkSize - 1) / kChunkSize;
}

// Calls launch(table, blocks) for consecutive batches of the chunks of the tensors at
// `positions`, each batch as many chunks as the table holds. numel_at(position) is a
// tensor's size, address_at(list, position) its address in list `list` (< Depth). Block
// indices start at `first_block`; returns the index after the last block.
template <int Depth, typename Capacity, typename NumelAt, typename AddressAt, typename Launch>
int64_t pack_launches(
    const std::vector<int64_t>& positions,
    NumelAt&& numel_at,
    AddressAt&& address_at,
    int64_t first_block,
    Launch&& launch) {
  using Table = LaunchTable<Depth, Capacity>;
  static_assert(Depth <= kMaxDepth, "a deeper table needs its size checked against the parameter limits");
  Table table;
  table.first_block = first_block;
  int tensors = 0;
  int blocks = 0;
  auto flush = [&]() {
    if (blocks > 0) {
      launch(static_cast<const Table&>(table), blocks);
    }
    table.first_block += blocks;
    tensors = 0;
    blocks = 0;
  };
  for (int64_t pos : positions) {
    const int64_t numel = numel_at(pos);
    for (int64_t chunk = 0; chunk < chunks_of(numel); ++chunk) {
      // A tensor whose chunks continue in a new launch takes a slot there again.
      if (tensors == 0 || table.position[tensors - 1] != pos) {
        if (tensors == Table::kMaxTensors) {
          flush();
        }
        for (int d = 0; d < Depth; ++d) {
          table.addr[d][tensors] = address_at(d, pos);
        }
        table.numel[tensors] = numel;
        table.position[tensors] = static_cast<int32_t>(pos);
        ++tensors;
      }
      table.block_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      table.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      if (blocks == Table::kMaxBlocks) {
        flush();
      }
    }
  }
  flush();
  return table.first_block;
}

}  // namespace fsam_fused
