"""The ``torch`` backend: the three ops of DESIGN.md section 2 with ``torch._foreach_*``.

Works on every device and floating dtype. It keeps two flat fp32 work buffers per plan
(allocated once, reused every step): ``g`` holds the gradients read once (and
unscaled), ``d`` the perturbation direction. Flat buffers let one masked fill make a
non-finite step harmless: ``0 * inf`` is NaN, so scaling by a zero flag alone would
not protect parameters or momentum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..plan import LMBDA, DevicePlan
from ..state import view_like

name = "torch"
device_types = None  # every device torch supports


@dataclass
class _Workspace:
    g_flat: Tensor
    d_flat: Tensor
    g: list[Tensor]
    d: list[Tensor]


def _workspace(plan: DevicePlan) -> _Workspace:
    ws = plan.cache.get(name)
    if ws is None:
        total = sum(p.numel() for p in plan.params)
        g_flat = torch.empty(total, dtype=torch.float32, device=plan.device)
        d_flat = torch.empty_like(g_flat)
        offsets = []
        offset = 0
        for p in plan.params:
            offsets.append(offset)
            offset += p.numel()
        ws = _Workspace(
            g_flat=g_flat,
            d_flat=d_flat,
            g=[view_like(g_flat, o, p) for o, p in zip(offsets, plan.params)],
            d=[view_like(d_flat, o, p) for o, p in zip(offsets, plan.params)],
        )
        plan.cache[name] = ws
    return ws


def supports(dtype: torch.dtype) -> bool:
    """Every real floating dtype."""
    return dtype.is_floating_point


def _pick(items: list[Tensor], positions: list[int]) -> list[Tensor]:
    return [items[i] for i in positions]


def sq_norm(plan: DevicePlan) -> Tensor:
    """``sum ||a * d||^2`` over the plan, as an fp32 0-dim tensor on its device."""
    ws = _workspace(plan)
    torch._foreach_copy_(ws.g, plan.grads)
    if plan.inv_scale is not None:
        ws.g_flat.mul_(plan.inv_scale)
    ws.d_flat.copy_(ws.g_flat)
    partials = []
    for group, positions in plan.group_positions:
        _, sigma, _, adaptive = plan.group_hparams[group]
        d = _pick(ws.d, positions)
        if plan.momentum is not None and sigma != 0.0:
            torch._foreach_add_(d, _pick(plan.momentum, positions), alpha=-sigma)
        if adaptive:
            d = torch._foreach_mul(d, torch._foreach_abs(_pick(plan.params, positions)))
        partials.extend(torch._foreach_norm(d))
    if not partials:
        return torch.zeros((), dtype=torch.float32, device=plan.device)
    return torch.stack(partials).square().sum()


def perturb_(plan: DevicePlan, total_sq_norm: Tensor) -> None:
    """EMA update of the momentum, ``backup <- p`` and ``p <- p + e``, all on the device.

    A non-finite ``total_sq_norm`` turns the step into a no-op for parameters and
    momentum (the backup is still written, so ``restore_`` stays unconditional).
    """
    ws = _workspace(plan)
    step_ok = torch.isfinite(total_sq_norm)
    ws.g_flat.masked_fill_(~step_ok, 0.0)
    ws.d_flat.masked_fill_(~step_ok, 0.0)
    inv_norm = step_ok.float() / (total_sq_norm.sqrt() + plan.eps)
    torch._foreach_copy_(plan.backup, plan.params)
    if plan.momentum is not None:
        # m <- lmbda * m + (1 - lmbda) * g as a lerp towards g; weight 0 leaves m as is.
        weight = (1.0 - plan.coef[:, LMBDA]) * step_ok
        torch._foreach_lerp_(plan.momentum, ws.g, list(weight.unbind()))
    for group, positions in plan.group_positions:
        rho, _, _, adaptive = plan.group_hparams[group]
        d = _pick(ws.d, positions)
        params = _pick(plan.params, positions)
        if adaptive:
            torch._foreach_mul_(d, params)
            torch._foreach_mul_(d, params)
        torch._foreach_mul_(d, inv_norm * rho)
        torch._foreach_add_(params, d)


def restore_(plan: DevicePlan) -> None:
    """``p <- backup``, a bit-exact copy in place."""
    torch._foreach_copy_(plan.params, plan.backup)
