"""How the CUDA launchers pack tensor chunks into launch tables (csrc/launch_table.h), on the CPU.

The launchers pass the large table where the driver accepts 32 KB of kernel parameters and
the 4 KB table otherwise (an older driver, or a CUDA-graph capture); both run through the
same packer, which the ``_pack_launch_tables`` test hook drives here without a GPU.
"""

import pytest
import torch

from tests.op_oracle import CUDA_CHUNK

_ops = pytest.importorskip("fsam_fused._ops", reason="the native extension is not built")

LAUNCH, FIRST_BLOCK, BLOCK, SLOT, POSITION, NUMEL, ADDRESS, CHUNK = range(8)

SPANNING = [0, 1, CUDA_CHUNK, CUDA_CHUNK + 1, 0, 300 * CUDA_CHUNK, 3, 41 * CUDA_CHUNK + 7]
NUMELS = {
    "more_tensors_than_a_table": [1 + i % 5 for i in range(200)],
    "more_chunks_than_a_table": [700 * CUDA_CHUNK + 5],
    "tensors_across_launches": SPANNING * 3,
    "empty": [],
}


def _pack(numels: list[int], positions: list[int], first_block: int, small: bool):
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    rows, max_tensors, max_blocks = torch.ops.fsam_fused._pack_launch_tables(
        as_tensor(numels), as_tensor(positions), first_block, small
    )
    return rows.tolist(), max_tensors, max_blocks


@pytest.mark.parametrize("small", [True, False], ids=["4KB", "32KB"])
@pytest.mark.parametrize("every", [1, 2], ids=["all_tensors", "every_other_tensor"])
@pytest.mark.parametrize("name", NUMELS)
def test_every_chunk_is_packed_once_in_order_into_full_tables(name, every, small):
    numels = NUMELS[name]
    positions = list(range(0, len(numels), every))
    first_block = 17
    rows, max_tensors, max_blocks = _pack(numels, positions, first_block, small)

    chunks = [(pos, c) for pos in positions for c in range(-(-numels[pos] // CUDA_CHUNK))]
    assert [(r[POSITION], r[CHUNK]) for r in rows] == chunks
    assert [r[FIRST_BLOCK] + r[BLOCK] for r in rows] == list(range(first_block, first_block + len(chunks)))
    launches = sorted({r[LAUNCH] for r in rows})
    assert launches == list(range(len(launches)))
    for launch in launches:
        table = [r for r in rows if r[LAUNCH] == launch]
        assert [r[BLOCK] for r in table] == list(range(len(table)))
        assert len(table) <= max_blocks
        slots = {r[SLOT]: (r[POSITION], r[NUMEL], r[ADDRESS]) for r in table}
        assert sorted(slots) == list(range(len(slots))) and len(slots) <= max_tensors
        for pos, numel, address in slots.values():
            assert numel == numels[pos] and address == 16 * (pos + 1)
        if launch != launches[-1]:
            assert len(table) == max_blocks or len(slots) == max_tensors, f"launch {launch} ended before full"


def test_the_small_table_holds_fewer_tensors_and_blocks():
    _, small_tensors, small_blocks = _pack([1], [0], 0, True)
    _, large_tensors, large_blocks = _pack([1], [0], 0, False)
    assert small_tensors < large_tensors and small_blocks < large_blocks
