"""The block map: the work of a tensor list cut into fixed-size chunks, one per program.

Each entry is ``(tensor index, start, count)``: program ``c`` of a launch handles
elements ``[start, start + count)`` of tensor ``index`` (``count <= CHUNK``). Built once
per plan and element type; it depends only on the tensors' sizes, so it stays valid
while their addresses change. Empty tensors get no entry; a 0-dim tensor gets one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..upload import Staging

# Elements per program. Large enough that the per-program set-up (three dependent
# loads before the first data load) is small next to the streaming, small enough that
# a large model gives every SM several programs and the last wave is short.
CHUNK = 1 << 14

# int64s per entry: the row stride of the map.
ENTRY = tl.constexpr(3)


def chunk_entries(numels: list[int], indices: list[int], chunk: int = CHUNK) -> list[list[int]]:
    """``[index, start, count]`` for every chunk of the tensors at ``indices``."""
    entries = []
    for i in indices:
        for start in range(0, numels[i], chunk):
            entries.append([i, start, min(chunk, numels[i] - start)])
    return entries


def build_block_map(numels: list[int], indices: list[int], device: torch.device, staging: Staging) -> Tensor:
    """The int64 ``[chunks, 3]`` map of the tensors at ``indices`` on ``device`` (via ``staging``)."""
    entries = chunk_entries(numels, indices)
    block_map = torch.empty((len(entries), ENTRY.value), dtype=torch.int64, device=device)
    if entries:
        staging.upload(entries, block_map)
    return block_map


@triton.jit
def load_entry(block_map, c):
    """Tensor index, first element and element count of chunk ``c``.

    The count (at most CHUNK) is narrowed to int32, so the loop index and masks that
    derive from it are 32-bit: with int64 they took about twice the registers (101
    rather than 56 per thread in the fp32 perturb kernel) and halved occupancy. The
    start stays int64 for tensors of more than 2**31 elements.
    """
    entry = block_map + c * ENTRY
    return tl.load(entry), tl.load(entry + 1), tl.load(entry + 2).to(tl.int32)
