"""The reference F-SAM step: a plain per-tensor loop written from DESIGN.md section 1.

It is the oracle every backend is tested against and the baseline the benchmarks
compare with, so it is deliberately written the way the common SAM / F-SAM
implementations are: a clone of each gradient, a per-tensor EMA, a stacked norm of
per-tensor norms, a per-tensor perturbation and a saved copy of each parameter. It
keeps its momentum as separate per-parameter fp32 tensors in ``state[p]["momentum"]``,
present once seeded, like the authors' optimizer.

Unlike the fused backends it reads the norm back to the host to decide whether a step
is finite; that is the clearest way to write the rule, and speed is not its job.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from torch import Tensor


def _participants(param_groups: Iterable[dict[str, Any]]):
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield group, p


@torch.no_grad()
def first_step(
    param_groups: list[dict[str, Any]],
    state: MutableMapping[Tensor, dict[str, Any]],
    backups: dict[Tensor, Tensor],
    *,
    eps: float,
    with_momentum: bool,
    inv_scale: Tensor | None = None,
) -> bool:
    """Perturb the parameters in place; returns True when the step was skipped.

    A step is skipped, leaving parameters and momentum untouched, when the norm is not
    finite (a NaN or Inf gradient, or an overflowing sum).
    """
    directions = []
    for group, p in _participants(param_groups):
        grad = p.grad.float().clone()
        if inv_scale is not None:
            grad = grad * inv_scale.to(grad.device)
        st = state[p]
        if with_momentum and "momentum" in st:
            momentum = st["momentum"]
            d = grad - group["sigma"] * momentum
            new_momentum = momentum * group["lmbda"] + grad * (1 - group["lmbda"])
        else:
            d = grad
            new_momentum = grad if with_momentum else None
        directions.append((group, p, d, new_momentum))
    if not directions:
        return False

    shared_device = directions[0][1].device
    norm = torch.norm(
        torch.stack(
            [
                ((p.float().abs() if group["adaptive"] else 1.0) * d).norm(p=2).to(shared_device)
                for group, p, d, _ in directions
            ]
        ),
        p=2,
    )
    if not torch.isfinite(norm):
        return True

    for group, p, d, new_momentum in directions:
        if new_momentum is not None:
            state[p]["momentum"] = new_momentum
        scale = (group["rho"] / (norm + eps)).to(p.device)
        backups[p] = p.detach().clone()
        e = (p.float() ** 2 if group["adaptive"] else 1.0) * d * scale
        p.add_(e)
    return False


@torch.no_grad()
def restore(backups: dict[Tensor, Tensor]) -> None:
    """Put back the parameters saved by :func:`first_step` (a copy, bit-exact)."""
    for p, saved in backups.items():
        p.copy_(saved)
    backups.clear()
