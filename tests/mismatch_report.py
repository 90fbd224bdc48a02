"""Where two tensors disagree, told so that the failure can be debugged from the log alone.

A kernel that disagrees with the op oracle on a GPU machine leaves only its log behind, so
a failing comparison names the first mismatching element (its logical index and its place
in storage order), both values, how many elements differ, and the layout of every tensor
involved (dtype, shape, strides, storage offset, 16-byte alignment); the op oracle adds the
inputs at that element (tests/op_oracle.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def mismatches(actual: Tensor, expected: Tensor, rtol: float | None, atol: float = 0.0) -> Tensor:
    """Boolean mask (on the CPU) of the elements where ``actual`` and ``expected`` differ:
    bit for bit when ``rtol`` is None, else ``|a - e| > atol + rtol * |e|`` (NaN differs)."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if rtol is None:
        return a.view(_SAME_SIZE_INT[a.element_size()]) != e.view(_SAME_SIZE_INT[e.element_size()])
    return ~torch.isclose(a.double(), e.double(), rtol=rtol, atol=atol)


def first_mismatch(mask: Tensor) -> tuple[int, ...] | None:
    """The logical index of the first True element of ``mask`` (row-major), or None."""
    flat = mask.reshape(-1).nonzero()
    if flat.numel() == 0:
        return None
    return tuple(int(i) for i in torch.unravel_index(flat[0, 0], mask.shape)) if mask.dim() else ()


def storage_index(t: Tensor, index: tuple[int, ...]) -> int:
    """The element ``index`` of ``t`` counted in its storage order (from its first element)."""
    return sum(i * s for i, s in zip(index, t.stride()))


def value(t: Tensor, index: tuple[int, ...]) -> str:
    """``t[index]`` to 9 significant digits, with its bits in hex."""
    x = t.detach()[index].cpu()
    bits = int(x.view(_SAME_SIZE_INT[x.element_size()])) & ((1 << (8 * x.element_size())) - 1)
    return f"{float(x):.9g} (0x{bits:0{2 * x.element_size()}x})"


def layout(t: Tensor) -> str:
    """dtype, shape, strides, storage offset and 16-byte alignment of ``t``."""
    return (
        f"{str(t.dtype)[6:]} shape {tuple(t.shape)} strides {t.stride()} offset {t.storage_offset()} "
        f"(address % 16 = {t.data_ptr() % 16})"
    )


def describe(what: str, actual: Tensor, expected: Tensor, mask: Tensor, tolerance: str) -> tuple[str, tuple]:
    """The first line of a mismatch report, and the index it is about."""
    index = first_mismatch(mask)
    assert index is not None, "describe() needs at least one mismatch"
    line = (
        f"{what}: {int(mask.sum())} of {mask.numel()} elements differ ({tolerance}); first at index {index} "
        f"(storage element {storage_index(actual, index)}): got {value(actual, index)}, "
        f"expected {value(expected, index)}"
    )
    return line, index
