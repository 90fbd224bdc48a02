"""The ``reference`` backend: the per-tensor loop, written plainly from DESIGN.md section 1.

It is the oracle the kernels are tested against and the baseline the benchmarks compare
with, so it is deliberately written the way the common SAM / F-SAM implementations are: a
clone of each gradient, a per-tensor EMA, a stacked norm of per-tensor norms, a per-tensor
perturbation and a saved clone of each parameter. It reads each tensor's seeded flag and
the norm back to the host (to decide whether a step is finite): the clearest way to write
the rules, and speed is not its job.

It works on the same plans and flat momentum slots as the other backends (one state, one
checkpoint format, one optimizer code path); the tests' independent fp64 oracle checks the
optimizer as a whole, plans and state included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import ADAPTIVE, LMBDA, RHO, SIGMA, DevicePlan

name = "reference"
device_types = None  # every device torch supports

_DIRECTIONS = "reference.directions"
_BACKUPS = "reference.backups"


def supports(dtype: torch.dtype) -> bool:
    """Every real floating dtype."""
    return dtype.is_floating_point


def sq_norm(plan: DevicePlan) -> Tensor:
    """The squared norm ``||a * d||^2`` over the plan; also works out each ``d`` and new momentum."""
    seeded = plan.state.seeded.index_select(0, plan.slots).tolist()
    directions = []
    for i, g in enumerate(plan.grad_list()):
        row = plan.group_rows[plan.group_list[i]]
        grad = g.float().clone()
        if plan.inv_scale is not None:
            grad = grad * plan.inv_scale.to(grad.device)
        if plan.momentum is not None and seeded[i]:
            momentum = plan.momentum[i]
            d = grad - row[SIGMA] * momentum
            new_momentum = momentum * row[LMBDA] + grad * (1 - row[LMBDA])
        else:
            d = grad
            new_momentum = grad if plan.momentum is not None else None
        directions.append((d, new_momentum))
    plan.cache[_DIRECTIONS] = directions
    norm = torch.norm(
        torch.stack(
            [
                ((p.float().abs() if plan.group_rows[plan.group_list[i]][ADAPTIVE] else 1.0) * d).norm(p=2)
                for i, (p, (d, _)) in enumerate(zip(plan.params, directions))
            ]
        ),
        p=2,
    )
    # sqrt(x * x) == x in binary floating point (barring overflow), so perturb_ gets this norm back.
    return norm * norm


def perturb_(plan: DevicePlan, total_sq_norm: Tensor) -> None:
    """Update the momentum, save a clone of each parameter and add ``e``; nothing if not finite."""
    directions = plan.cache.pop(_DIRECTIONS)
    backups: list[Tensor] = []
    plan.cache[_BACKUPS] = backups
    norm = total_sq_norm.sqrt()
    if not torch.isfinite(norm):
        return
    for i, (p, (d, new_momentum)) in enumerate(zip(plan.params, directions)):
        row = plan.group_rows[plan.group_list[i]]
        if new_momentum is not None:
            plan.momentum[i].copy_(new_momentum)
        scale = (row[RHO] / (norm + plan.eps)).to(p.device)
        backups.append(p.detach().clone())
        e = (p.float() ** 2 if row[ADAPTIVE] else 1.0) * d * scale
        p.add_(e)


def restore_(plan: DevicePlan) -> None:
    """Put back the parameters saved by :func:`perturb_` (a copy, bit-exact)."""
    for p, saved in zip(plan.params, plan.cache.pop(_BACKUPS, [])):
        p.copy_(saved)
