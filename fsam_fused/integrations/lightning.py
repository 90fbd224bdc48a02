"""PyTorch Lightning: checks for the SAM step in manual optimisation, and fp16 with a GradScaler.

A SAM step runs inside ``training_step`` with ``automatic_optimization = False``: the first
pass with ``self.manual_backward(loss)``, then ``optimizer.step(closure)`` with the second
pass in the closure (``docs/training_loops.md``). Lightning's optimizer wrapper routes that
call through the precision plugin, which counts the step (``global_step``) and runs
``on_before_optimizer_step`` between the closure and ``second_step``.

Two things Lightning cannot tell by itself, so this module adds them:

* :class:`SAMStepChecks`, a callback, turns the silent mistakes into errors: automatic
  optimisation left on (Lightning would call ``step(closure)`` before any backward) and
  ``optimizer.step()`` without the closure. (A step without the first backward is refused by
  the optimizer itself: ``step(closure)`` finds no gradient.)
* :class:`SAMMixedPrecision`, the ``"16-mixed"`` precision plugin for F-SAM. Lightning's own
  runs the closure *before* calling ``optimizer.step()`` and then steps through
  ``scaler.step(optimizer)`` with no closure, so the second pass cannot fall between the two
  halves of the step; this one hands its GradScaler to both halves instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import do_nothing_closure
from lightning.pytorch.plugins.precision import MixedPrecision

from ..optimizer import FriendlySAM

_AUTOMATIC = (
    "F-SAM needs manual optimisation in Lightning: set self.automatic_optimization = False in "
    "the LightningModule's __init__ and run the step in training_step (first pass with "
    "self.manual_backward, then optimizer.step(closure) with the second pass in the closure; "
    "see docs/training_loops.md)"
)
_NO_CLOSURE = (
    "optimizer.step() was called without a closure: a SAM step needs the second forward and "
    "backward pass inside it, optimizer.step(closure=lambda: ...) with self.manual_backward in "
    "the closure"
)


def _check_manual_optimization(module: pl.LightningModule) -> None:
    if module.automatic_optimization:
        raise RuntimeError(_AUTOMATIC)


class SAMStepChecks(pl.Callback):
    """Fail fast when a LightningModule drives ``FriendlySAM``/``SAM`` in an order that cannot work.

    Return it from ``configure_callbacks`` (or pass it to the Trainer). It checks, for the
    optimizers that are ours: manual optimisation; no stock ``"16-mixed"`` GradScaler (use
    :class:`SAMMixedPrecision`); at each step, that the closure ran a backward pass.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(isinstance(opt, FriendlySAM) for opt in trainer.optimizers):
            return
        _check_manual_optimization(pl_module)
        plugin = trainer.precision_plugin
        if getattr(plugin, "scaler", None) is not None and not isinstance(plugin, SAMMixedPrecision):
            raise RuntimeError(
                "Lightning's 16-mixed precision plugin cannot drive a SAM step (it runs the closure "
                "before optimizer.step() and then steps without it); pass "
                'plugins=[fsam_fused.integrations.lightning.SAMMixedPrecision("16-mixed", "cuda")] '
                "to the Trainer instead of precision='16-mixed'"
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Runs after the closure, before ``second_step``: ``first_step`` cleared the gradients."""
        if not isinstance(optimizer, FriendlySAM):
            return
        if not any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            raise RuntimeError(_NO_CLOSURE)


class SAMMixedPrecision(MixedPrecision):
    """Lightning's mixed precision, with the GradScaler driving both halves of a SAM step.

    ``Trainer(plugins=[SAMMixedPrecision("16-mixed", "cuda")])``. The first pass's
    ``manual_backward`` scales the loss; ``optimizer.step(closure)`` then runs
    ``first_step(grad_scaler=...)``, the closure, unscales the second-pass gradients (so
    ``on_before_optimizer_step`` and clipping see true values), ``second_step`` and
    ``scaler.update()``, by the optimizer's own ``step`` rules (``sam_interval``: a plain step,
    its gradient unscaled and the hooks run before it; a closure that raises puts the parameters
    back). An overflow in either pass skips the whole step. Other optimizers, and
    ``"bf16-mixed"`` (no scaler), step as with the stock plugin.
    """

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if self.scaler is None or not isinstance(optimizer, FriendlySAM):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        _check_manual_optimization(model)
        if closure is do_nothing_closure:
            raise RuntimeError(_NO_CLOSURE)
        scaler = self.scaler

        def before_base_step() -> None:
            scaler.unscale_(optimizer)
            self._after_closure(model, optimizer)

        # (step()'s own rules hold: sam_interval, the checks for a missing backward, the parameters
        # put back when the closure raises.)
        closure_result = optimizer.step(closure, grad_scaler=scaler, before_base_step=before_base_step)
        scaler.update()
        return closure_result
