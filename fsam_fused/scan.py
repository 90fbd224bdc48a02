"""The per-step look at the parameters: who has a gradient, and did anything the plans depend on change.

Every step has to read each parameter's ``.grad``; everything else about the step (plans,
launch tables, flat state) can be reused from the previous step as long as nothing it
depends on changed. A *scan* does that per-tensor work in one loop and answers one question,
``changed``: did the set of parameters (group membership), a parameter's storage, dtype,
shape or strides, the set of parameters with a gradient, a gradient's layout, or the storage
of a momentum tensor that ``optimizer.state`` hands out (:meth:`watch`) differ from the
previous scan? Only then does the optimizer re-plan, with every check applied.

Two implementations share this interface: the compiled one in ``fsam_fused._C``
(``csrc/host/param_scan.cpp``, used when the extension is built and every parameter is a
plain tensor: it reads the gradients without creating Python objects for them) and
:class:`PythonScan` here, for DTensor parameters and installations without the extension.

Gradients whose strides differ from their parameter's are copied into the parameter's
layout, since every kernel walks a parameter and its gradient in the same memory order.
A scan holds the step's gradients until :meth:`release` (the optimizer releases them at
the end of ``first_step``, so no gradient outlives the step that used it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from . import distributed
from .state import layout_of


class Scan(Protocol):
    """What the optimizer needs from a scan (both implementations)."""

    def scan(self, param_lists: Sequence[Sequence[Tensor]]) -> bool: ...

    def grads(self, positions: Sequence[int]) -> list[Tensor | None]: ...

    def grad_addresses(self, positions: Sequence[int]) -> list[int]: ...

    def release(self) -> None: ...

    def watch(self, tensors: list[Tensor]) -> None: ...


def in_param_layout(grad: Tensor, param: Tensor) -> Tensor:
    """``grad``, copied into ``param``'s memory layout if it has other strides."""
    if grad.layout != torch.strided or grad.numel() <= 1 or grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


class PythonScan:
    """The scan in Python, over the local parts of any parameters (DTensor included).

    Args:
        param_lists: each param group's parameter list, as the optimizer holds it.
    """

    def __init__(self, param_lists: Sequence[Sequence[Tensor]]) -> None:
        self._members = [list(params) for params in param_lists]
        self.params = [p for params in self._members for p in params]
        self._signature: tuple | None = None
        self._grads: list[Tensor | None] = []
        self._watched: list[Tensor] = []

    def scan(self, param_lists: Sequence[Sequence[Tensor]]) -> bool:
        """Read every gradient; True when membership, a parameter or the gradient set/layout changed."""
        changed = not _same_members(param_lists, self._members)
        signature = []
        grads: list[Tensor | None] = []
        for p in self.params:
            local = distributed.local_tensor(p)
            grad = p.grad
            if grad is not None:
                grad = distributed.local_tensor(grad)
                grad_layout = (grad.layout, layout_of(grad) if grad.layout == torch.strided else None)
                grad = in_param_layout(grad, local)
            else:
                grad_layout = None
            grads.append(grad)
            signature.append((local.data_ptr(), layout_of(local), grad_layout))
        signature.extend(distributed.local_tensor(t).data_ptr() for t in self._watched)
        signature = tuple(signature)
        changed = changed or signature != self._signature
        self._signature, self._grads = signature, grads
        return changed

    def grads(self, positions: Sequence[int]) -> list[Tensor | None]:
        """This step's (local, parameter-laid-out) gradients at ``positions``; None where absent."""
        return [self._grads[i] for i in positions]

    def grad_addresses(self, positions: Sequence[int]) -> list[int]:
        """The data addresses of :meth:`grads` (0 where absent), without the tensors."""
        return [g.data_ptr() if g is not None else 0 for g in self.grads(positions)]

    def release(self) -> None:
        """Drop the references to this step's gradients."""
        self._grads = []

    def watch(self, tensors: list[Tensor]) -> None:
        """Also compare the storage of ``tensors`` (the momentum ``optimizer.state`` hands out) at
        each scan from the next one on: ``.data = t`` on one of them is a change."""
        self._watched = list(tensors)
        if self._signature is not None:
            self._signature = self._signature[: len(self.params)] + tuple(
                distributed.local_tensor(t).data_ptr() for t in self._watched
            )


def _same_members(param_lists: Sequence[Sequence[Tensor]], members: list[list[Tensor]]) -> bool:
    return len(param_lists) == len(members) and all(
        len(a) == len(b) and all(x is y for x, y in zip(a, b)) for a, b in zip(param_lists, members)
    )


def make_scan(param_lists: Sequence[Sequence[Tensor]]) -> Scan:
    """The compiled scan when it is built and every parameter is a plain tensor, else :class:`PythonScan`."""
    compiled = _compiled_scan_class()
    plain = all(type(p) in (Tensor, torch.nn.Parameter) for params in param_lists for p in params)
    if compiled is not None and plain:
        return compiled([list(params) for params in param_lists])
    return PythonScan(param_lists)


def _compiled_scan_class():
    try:
        from ._C import ParamScan
    except ImportError:
        return None
    return ParamScan
