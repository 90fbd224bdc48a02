// A test hook: `torch.ops.fsam_fused._pack_launch_tables` runs the CUDA launchers' table
// packing (launch_table.h) on the host and returns what each launch's table holds, so
// tests check the packing for both table sizes without a GPU (tests/test_launch_tables.py).
// Not part of the optimizer's API.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "launch_table.h"

namespace fsam_fused {
namespace {

// Columns of the result, one row per block.
enum Column { kLaunch, kFirstBlock, kBlock, kSlot, kPosition, kNumel, kAddress, kChunk, kColumns };

template <typename Capacity>
std::vector<int64_t> pack(
    const std::vector<int64_t>& numels,
    const std::vector<int64_t>& positions,
    int64_t first_block) {
  std::vector<int64_t> rows;
  int64_t launch = 0;
  pack_launches<1, Capacity>(
      positions,
      [&](int64_t pos) { return numels[pos]; },
      // A stand-in address that names the position, so a test can tell whose it is.
      [&](int, int64_t pos) { return reinterpret_cast<void*>((pos + 1) * 16); },
      first_block,
      [&](const LaunchTable<1, Capacity>& table, int blocks) {
        for (int b = 0; b < blocks; ++b) {
          const int slot = table.block_tensor[b];
          const int64_t row[kColumns] = {
              launch,
              table.first_block,
              b,
              slot,
              table.position[slot],
              table.numel[slot],
              reinterpret_cast<int64_t>(table.addr[0][slot]),
              table.block_chunk[b]};
          rows.insert(rows.end(), row, row + kColumns);
        }
        ++launch;
      });
  return rows;
}

// numels: int64 [n], the sizes of the op's tensors; positions: int64, the tensors to pack
// (in order). Returns the int64 [blocks, kColumns] rows and the table's capacity in
// tensors and in blocks.
std::tuple<at::Tensor, int64_t, int64_t> pack_launch_tables(
    const at::Tensor& numels, const at::Tensor& positions, int64_t first_block, bool small) {
  TORCH_CHECK(numels.scalar_type() == at::kLong && positions.scalar_type() == at::kLong, "int64 tensors expected");
  const auto n = numels.contiguous();
  const auto p = positions.contiguous();
  const std::vector<int64_t> sizes(n.data_ptr<int64_t>(), n.data_ptr<int64_t>() + n.numel());
  const std::vector<int64_t> order(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + p.numel());
  for (int64_t pos : order) {
    TORCH_CHECK(pos >= 0 && pos < n.numel(), "position ", pos, " out of range");
  }
  const std::vector<int64_t> rows =
      small ? pack<SmallTable>(sizes, order, first_block) : pack<LargeTable>(sizes, order, first_block);
  at::Tensor out = at::empty({static_cast<int64_t>(rows.size()) / kColumns, kColumns}, numels.options());
  std::copy(rows.begin(), rows.end(), out.data_ptr<int64_t>());
  if (small) {
    return {out, SmallTable::kTensors, SmallTable::kBlocks};
  }
  return {out, LargeTable::kTensors, LargeTable::kBlocks};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsam_fused, m) {
  m.def(
      "_pack_launch_tables(Tensor numels, Tensor positions, int first_block, bool small_table) "
      "-> (Tensor, int, int)");
}

TORCH_LIBRARY_IMPL(fsam_fused, CPU, m) {
  m.impl("_pack_launch_tables", &pack_launch_tables);
}

}  // namespace fsam_fused
