"""Step plans: what one backend computes on one device in one step.

A plan lists the parameters that take part in a step (those with a gradient), in a
fixed order, with views of their momentum and backup slices and the per-tensor
metadata the kernels need. The optimizer caches plans by participation and refreshes
only what changes every step (the gradient tensors and the coefficient table), so a
backend never walks ``param_groups`` itself.

Coefficient table ``coef`` (fp32, one row per tensor, on the plan's device):
``rho``, ``sigma``, ``lmbda``, ``adaptive`` (0 or 1), ``adaptive_eta`` and ``fisher_eta``
of the tensor's group (DESIGN.md section 1; the column constants below, shared with
csrc/fsam_math.h and the Triton kernels), with
``lmbda`` already set to 0 for tensors whose momentum is not seeded yet. With the
momentum of an unseeded tensor kept at zero, the one formula of DESIGN.md section 1
then covers the first step as well: ``d = g - sigma * 0 = g`` and ``m <- 0 * m + g``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .state import DeviceState

RHO, SIGMA, LMBDA, ADAPTIVE, ADAPTIVE_ETA, FISHER_ETA = range(6)
COEF_COLUMNS = 6


@dataclass(eq=False)
class DevicePlan:
    """The tensors of one device that one backend updates in one step.

    Attributes that backends read:
      params, grads, momentum (None when the optimizer keeps no momentum), backup:
        equally long lists, position ``i`` describing one parameter; momentum and
        backup views have the parameter's shape and strides, grads too.
      coef: fp32 ``[n, COEF_COLUMNS]`` device tensor (see module docstring), refreshed every step.
      group_positions: ``(group_index, positions)`` pairs, for backends that work per group.
      group_hparams: host copies of each group's ``(rho, sigma, lmbda, adaptive)``.
      eps: the constant added to the norm.
      inv_scale: optional fp32 0-dim device tensor multiplied into every gradient
        element as it is read (an inverse loss scale), or None.
      cache: backend-private data that lives as long as the plan (buffers, pointer
        tables); backends key it by their own name.
    """

    device: torch.device
    state: DeviceState
    params: list[Tensor]
    momentum: list[Tensor] | None
    backup: list[Tensor]
    slots: Tensor
    group_of: Tensor
    group_positions: list[tuple[int, list[int]]]
    eps: float
    grads: list[Tensor] = field(default_factory=list)
    coef: Tensor | None = None
    group_hparams: list[tuple[float, float, float, bool]] = field(default_factory=list)
    inv_scale: Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.params)


def build_plan(state: DeviceState, slots: list[int], group_of: list[int], eps: float) -> DevicePlan:
    """A plan over the parameters of ``state`` at ``slots``, each in group ``group_of[i]``."""
    params = [state.params[s] for s in slots]
    positions: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        positions.setdefault(g, []).append(i)
    return DevicePlan(
        device=state.device,
        state=state,
        params=params,
        momentum=[state.momentum[s] for s in slots] if state.momentum is not None else None,
        backup=[state.backup[s] for s in slots],
        slots=torch.tensor(slots, dtype=torch.int64, device=state.device),
        group_of=torch.tensor(group_of, dtype=torch.int64, device=state.device),
        group_positions=sorted(positions.items()),
        eps=eps,
    )


def refresh_coefficients(plan: DevicePlan, group_table: Tensor) -> None:
    """Set ``plan.coef`` from the device's group table and the seeded flags.

    Runs on the device (two gathers and a multiply); nothing is read back.
    """
    coef = group_table.index_select(0, plan.group_of)
    coef[:, LMBDA] *= plan.state.seeded.index_select(0, plan.slots)
    plan.coef = coef


def mark_seeded(plan: DevicePlan, step_ok: Tensor) -> None:
    """Record on the device that a finite step seeded the momentum of the plan's tensors."""
    seeded = plan.state.seeded
    seeded.index_copy_(0, plan.slots, torch.maximum(seeded.index_select(0, plan.slots), step_ok))
