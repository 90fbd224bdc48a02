"""The op oracle's lists reach both paths of a kernel: aligned tensors and unaligned views."""

import torch

from tests.op_oracle import SHAPE_SETS, make_lists


def test_lists_mix_16_byte_aligned_tensors_and_unaligned_views():
    gen = torch.Generator().manual_seed(0)
    lists = make_lists(SHAPE_SETS["over_one_launch"], [torch.bfloat16], "cpu", gen)
    per_tensor = zip(lists.params, lists.grads, lists.momentum, lists.backup)
    aligned = [all(t.data_ptr() % 16 == 0 for t in ts) for ts in per_tensor]
    assert 0.3 < sum(aligned) / len(aligned) < 0.7
    assert any(p.storage_offset() > 0 for p in lists.params)
