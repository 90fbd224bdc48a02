"""The tensor table: where each tensor of a plan lives, as int64 addresses on the device.

One int64 ``[ROWS, n]`` tensor per plan, one column per tensor: the addresses of the
parameter, its gradient, momentum and backup. Kernels receive the table and ``n`` and
turn an address into a typed pointer, so one launch reaches every tensor of the model.
Every list shares the parameter's memory order, so each tensor is walked as flat
storage from its address (channels_last included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..upload import Staging

PARAM, GRAD, MOMENTUM, BACKUP = (tl.constexpr(row) for row in range(4))
ROWS = 4


def addresses(tensors: list[Tensor]) -> list[int]:
    """The data pointers of ``tensors``, in order."""
    return [t.data_ptr() for t in tensors]


def build_table(
    params: list[Tensor],
    grads: list[Tensor],
    momentum: list[Tensor] | None,
    backup: list[Tensor],
    staging: Staging,
) -> Tensor:
    """The table for one plan (uploaded through ``staging``); the momentum row is 0 where the
    optimizer keeps none."""
    rows = [
        addresses(params),
        addresses(grads),
        addresses(momentum) if momentum is not None else [0] * len(params),
        addresses(backup),
    ]
    table = torch.empty((ROWS, len(params)), dtype=torch.int64, device=params[0].device)
    staging.upload(rows, table)
    return table


@triton.jit
def tensor_address(table, n, row: tl.constexpr, t):
    """The int64 address of tensor ``t`` in ``row`` of the table (0 for a missing momentum)."""
    return tl.load(table + row * n + t)


@triton.jit
def load_addresses(table, n, t):
    """The addresses of tensor ``t``'s parameter, gradient, momentum and backup."""
    return (
        tensor_address(table, n, PARAM, t),
        tensor_address(table, n, GRAD, t),
        tensor_address(table, n, MOMENTUM, t),
        tensor_address(table, n, BACKUP, t),
    )


@triton.jit
def element_ptr(address, start, ELEMENT: tl.constexpr):
    """Typed pointer to element ``start`` of the tensor at ``address``."""
    return address.to(tl.pointer_type(ELEMENT)) + start
