"""The base optimizer's step, at the end of a SAM step: skipped on the device where it can be.

A step whose gradients were not finite must leave the base optimizer as it was. A fused
torch.optim optimizer skips its step on a device flag read from its ``found_inf``
attribute, as GradScaler drives it, so nothing syncs; any other base optimizer is stepped
or not after one host read of the flag.

One exception: until the base optimizer has stepped a parameter, its state for it does not
exist, and a fused base optimizer told to skip the step that creates it leaves that state
uninitialised (torch's fused SGD does). So a step that may reach such a parameter (in either
pass: the base optimizer steps what has a second-pass gradient) is decided on the host too.
:class:`BaseStep` keeps the parameters the base optimizer has stepped; while every parameter
is among them (the common case) telling costs nothing per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .plan import Plans, StepPlanner


class BaseStep:
    """Steps ``base`` (a torch.optim optimizer) unless a step was found non-finite.

    Args:
        base: the base optimizer.
        device: where its skip flag lives (the optimizer's main device).
    """

    def __init__(self, base: torch.optim.Optimizer, device: torch.device) -> None:
        self.base = base
        # The attribute is set here, once, to a flag that each step overwrites in place:
        # torch.compile traces the copy, while an attribute assignment inside a compiled
        # second_step fails on some torch releases (2.11: "setattr on a user-defined object").
        self.flag: Tensor | None = None
        if getattr(base, "_step_supports_amp_scaling", False):
            self.flag = torch.zeros((), dtype=torch.float32, device=device)
            base.found_inf = self.flag
        self.ready: set[Tensor] = set()  # parameters the base optimizer has stepped
        self.new = True  # this step's first pass reaches a parameter outside ``ready``
        self._note_base_state()

    def note_participants(self, flat_params: list[Tensor], plans: Plans) -> None:
        """After a re-plan: whether the first pass reaches a parameter new to the base optimizer
        (its first step, a group added, a layer that starts training)."""
        self.ready.intersection_update(flat_params)  # forget parameters no longer here
        self.new = any(flat_params[i] not in self.ready for _, plan in plans for i in plan.positions)

    def __call__(self, found_inf: Tensor, planner: StepPlanner, plans: Plans) -> None:
        """The base optimizer's step, skipped where ``found_inf`` (fp32 0-d) is 1; ``plans`` are the
        step's, ``planner`` the optimizer's (its scan tells whether the second pass differs)."""
        base, flag = self.base, self.flag
        if flag is None:  # the one host sync, for base optimizers that cannot skip on the device
            if not bool(found_inf):
                base.step()
            return
        if self._base_state_dropped():
            self.from_base_state()  # (state cleared or replaced: its parameters are new again)
        if not self.new and not self._second_pass_may_reach_new(planner):
            if getattr(base, "found_inf", None) is not flag:
                base.found_inf = flag  # someone (a GradScaler.step on the base) took it away
            flag.copy_(found_inf)
            try:
                base.step()
            finally:
                flag.zero_()  # a direct base_optimizer.step() later is not skipped
        elif not bool(found_inf):
            base.step()
            self.ready.update(p for group in base.param_groups for p in group["params"] if p.grad is not None)
            flat_params = planner.flat.params
            # A first-pass parameter without a second-pass gradient stays new.
            self.new = any(flat_params[i] not in self.ready for _, plan in plans for i in plan.positions)
        self._note_base_state()

    def _note_base_state(self) -> None:
        self._state, self._state_size = self.base.state, len(self.base.state)

    def _base_state_dropped(self) -> bool:
        """Whether the base optimizer's state lost entries since the last step (``state.clear()``,
        ``del state[p]``, a new mapping: a common reset of momentum). O(1): an entry emptied in
        place (``state[p]["momentum_buffer"] = None``) goes unnoticed."""
        state = self.base.state
        return state is not self._state or len(state) < self._state_size

    def _second_pass_may_reach_new(self, planner: StepPlanner) -> bool:
        """Not once every parameter has been stepped; else when the second pass's gradients reach
        other parameters (or come in other layouts) than the first pass's, which ``new`` describes."""
        if len(self.ready) == len(planner.flat.params):
            return False
        scan = planner.scan
        if scan is None:
            return True
        changed = scan.scan([group["params"] for group in self.base.param_groups])
        scan.release()
        if changed:
            planner.scan = None  # it now holds the second pass's view: the next step re-plans
        return changed

    def from_base_state(self) -> None:
        """Take the parameters the base optimizer holds state for as stepped (after a checkpoint or
        a copy: exact whatever wrote it; a base that keeps no state, such as SGD without momentum,
        has its next step decided on the host, which then records it)."""
        base = self.base
        self.ready = {p for group in base.param_groups for p in group["params"] if base.state.get(p)}
        self.new = True  # until the next re-plan says otherwise
        self._note_base_state()

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "flag": self.flag}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.base, self.flag = state["base"], state["flag"]
        self.from_base_state()
        if self.flag is not None:
            self.base.found_inf = self.flag
