"""``restore_``: ``p <- backup`` for every tensor of a plan, a bit-exact copy."""

from __future__ import annotations

import triton
import triton.language as tl

from .block_map import load_entry
from .common import fixed
from .plan_arrays import PlanArrays
from .tensor_table import BACKUP, PARAM, element_ptr, tensor_address
from .vector import aligned_ptr, vectorizable, whole_vectors


@triton.jit
def _restore_chunk(p_ptr, b_ptr, count, BLOCK: tl.constexpr):
    for off in range(0, count, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        inside = idx < count
        tl.store(p_ptr + idx, tl.load(b_ptr + idx, mask=inside), mask=inside)


@triton.jit
def _restore_kernel(table, n, block_map, ELEMENT: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t, start, count = load_entry(block_map, c)
    p = tensor_address(table, n, PARAM, t)
    b = tensor_address(table, n, BACKUP, t)
    p_ptr = element_ptr(p, start, ELEMENT)
    b_ptr = element_ptr(b, start, ELEMENT)
    if vectorizable(p | b, start, count):
        _restore_chunk(
            aligned_ptr(p, start, ELEMENT), aligned_ptr(b, start, ELEMENT), whole_vectors(count), BLOCK
        )
    else:
        _restore_chunk(p_ptr, b_ptr, count, BLOCK)


_launch = fixed(_restore_kernel)


def restore_(arrays: PlanArrays) -> None:
    """Copy every backup of the plan described by ``arrays`` back into its parameter."""
    for segment in arrays.segments:
        _launch((segment.chunks,), arrays.table, arrays.n, segment.block_map, ELEMENT=segment.element)
