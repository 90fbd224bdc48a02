"""The two-pass F-SAM step with ``torch.amp.GradScaler``, without unscaling twice.

The first pass never goes through ``GradScaler.unscale_``: the backends multiply every
gradient element by the inverse scale as they read it, and the verdict on non-finite
values comes from the norm. The second pass is unscaled by the scaler as usual (once),
so gradient clipping between ``scaler.unscale_(optimizer)`` and ``second_step`` works.
``second_step`` folds the first pass's verdict into the scaler's record, so one
overflow in either pass skips the whole step and makes ``scaler.update()`` back off.

This relies on GradScaler's per-optimizer record (``_per_optimizer_states``), the same
record ``GradScaler.step`` uses; it has been stable across PyTorch 2.x.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState


def inverse_scale(scaler: torch.amp.GradScaler) -> Tensor | None:
    """``1 / scale`` as an fp32 device tensor, computed exactly as ``unscale_`` does; None if disabled."""
    if not scaler.is_enabled():
        return None
    scale = scaler._get_scale_async()
    if scale is None:
        raise RuntimeError("the GradScaler has no scale yet: call scaler.scale(loss).backward() first")
    return scale.double().reciprocal().float()


def traced_inverse_scale(scaler: torch.amp.GradScaler) -> Tensor | None:
    """:func:`inverse_scale` inside ``torch.compile``, which does not trace GradScaler's methods: its
    attributes are read instead (an eager step before has checked the scaler and made its scale)."""
    if not scaler._enabled:
        return None
    return scaler._scale.double().reciprocal().float()


def scaling(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    """``scaler`` if it scales; None for none or a disabled one (``GradScaler(enabled=False)`` is a
    no-op). (An attribute, not is_enabled(): this also runs inside torch.compile.)"""
    return scaler if scaler is not None and scaler._enabled else None


def unscaled_already(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` ran since the last ``scaler.update()``."""
    # (Attributes, not is_enabled(): this also runs inside torch.compile.)
    record = scaler._per_optimizer_states.get(id(optimizer)) if scaler._enabled else None
    return record is not None and record["stage"] is OptState.UNSCALED


def check_first_pass_scaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Raise if ``scaler.unscale_(optimizer)`` already ran in this iteration, before ``first_step``.

    ``first_step`` unscales the first-pass gradients as it reads them; unscaled twice, the
    perturbation would shrink by the scale, and the second pass would never be unscaled.
    """
    if unscaled_already(scaler, optimizer):
        raise RuntimeError(
            "scaler.unscale_(optimizer) ran before first_step(grad_scaler=scaler): first_step unscales "
            "the first-pass gradients itself. Call scaler.unscale_ only after the second backward "
            "(e.g. to clip gradients before second_step), or not at all"
        )


def step_found_inf(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, first_pass: Tensor
) -> Tensor:
    """The found-inf flag (fp32 0-d) of a whole step: first pass or second pass.

    Unscales the second-pass gradients if the user has not done so already, records the
    first pass's flag where ``scaler.update()`` will see it, and marks the optimizer as
    stepped for this iteration, as ``scaler.step`` would.
    """
    record = scaler._per_optimizer_states[id(optimizer)]
    if record["stage"] is OptState.STEPPED:
        raise RuntimeError("scaler.step() or second_step() already ran since the last scaler.update()")
    if record["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    per_device = record["found_inf_per_device"]
    device = first_pass.device
    per_device[device] = (
        torch.maximum(per_device[device], first_pass) if device in per_device else first_pass.clone()
    )
    found_inf = torch.zeros((), dtype=torch.float32, device=device)
    for flag in per_device.values():
        found_inf = torch.maximum(found_inf, flag.to(device))
    record["stage"] = OptState.STEPPED
    return found_inf
