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

from ..plan import ADAPTIVE, ADAPTIVE_ETA, FISHER_ETA, LMBDA, RHO, SIGMA, DevicePlan

name = "reference"
device_types = None  # every device torch supports

_DIRECTIONS = "reference.directions"
_BACKUPS = "reference.backups"


def supports(dtype: torch.dtype) -> bool:
    """Every real floating dtype."""
    return dtype.is_floating_point


def _normaliser(p: Tensor, grad: Tensor, row: tuple[float, ...]) -> Tensor | None:
    """The SAM variant's operator T (DESIGN.md section 1), None where it is 1.

    ``T = (|p| + adaptive_eta if adaptive else 1) / sqrt(1 + fisher_eta * g^2)``.
    """
    t = p.float().abs() + row[ADAPTIVE_ETA] if row[ADAPTIVE] else None
    if row[FISHER_ETA]:
        t = (t if t is not None else 1.0) / torch.sqrt(1 + row[FISHER_ETA] * grad * grad)
    return t


def _tensor_norm(p: Tensor, grad: Tensor, d: Tensor, t: Tensor | None, row: tuple[float, ...]) -> Tensor:
    """``||T d||`` of one tensor. With Fisher SAM as ``sqrt(sum (a d)^2 / f)``: a direction whose
    square overflows fp32 makes the step non-finite, as in SAM, even where ``f`` overflows too
    (``T = 0`` there would drop the element from the norm)."""
    if not row[FISHER_ETA]:
        return ((t if t is not None else 1.0) * d).norm(p=2)
    ad = d * (p.float().abs() + row[ADAPTIVE_ETA]) if row[ADAPTIVE] else d
    return ((ad * ad) / (1 + row[FISHER_ETA] * grad * grad)).sum().sqrt()


def sq_norm(plan: DevicePlan) -> Tensor:
    """The squared norm ``||T * d||^2`` over the plan; also works out each ``e``'s direction and
    the new momentum."""
    seeded = plan.state.seeded.index_select(0, plan.slots).tolist()
    directions, norms = [], []
    for i, (p, g) in enumerate(zip(plan.params, plan.grad_list())):
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
        t = _normaliser(p, grad, row)
        directions.append((d, t, new_momentum))
        norms.append(_tensor_norm(p, grad, d, t, row))
    plan.cache[_DIRECTIONS] = directions
    norm = torch.norm(torch.stack(norms), p=2)
    # sqrt(x * x) == x in binary floating point (barring overflow), so perturb_ gets this norm back.
    return norm * norm


def perturb_(plan: DevicePlan, total_sq_norm: Tensor) -> None:
    """Update the momentum, save a clone of each parameter and add ``e = rho T^2 d / ||T d||``;
    nothing if the norm is not finite."""
    directions = plan.cache.pop(_DIRECTIONS)
    backups: list[Tensor] = []
    plan.cache[_BACKUPS] = backups
    norm = total_sq_norm.sqrt()
    if not torch.isfinite(norm):
        return
    for i, (p, (d, t, new_momentum)) in enumerate(zip(plan.params, directions)):
        row = plan.group_rows[plan.group_list[i]]
        if new_momentum is not None:
            plan.momentum[i].copy_(new_momentum)
        scale = (row[RHO] / (norm + plan.eps)).to(p.device)
        backups.append(p.detach().clone())
        e = (t**2 if t is not None else 1.0) * d * scale
        p.add_(e)


def restore_(plan: DevicePlan) -> None:
    """Put back the parameters saved by :func:`perturb_` (a copy, bit-exact)."""
    for p, saved in zip(plan.params, plan.cache.pop(_BACKUPS, [])):
        p.copy_(saved)
