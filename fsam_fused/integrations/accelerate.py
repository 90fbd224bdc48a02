"""Hugging Face Accelerate: the two halves of a SAM step on a prepared optimizer.

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, whose ``step``
runs only at the end of an accumulation window and, with fp16, through
``GradScaler.step``, which refuses closures; ``first_step`` and ``second_step`` are not
reachable through it. :func:`first_step` and :func:`second_step` call them on the
optimizer inside, with the accelerator's GradScaler when it has one (fp16 on a GPU), and
check that the gradients are complete: inside ``accelerator.accumulate`` only the last
micro-batch of a pass synchronises them. ``docs/training_loops.md`` has the whole loop.
"""

from __future__ import annotations

from typing import Any

from ..optimizer import FriendlySAM


def unwrap(optimizer: Any) -> FriendlySAM:
    """The ``FriendlySAM``/``SAM`` inside a prepared (``AcceleratedOptimizer``) optimizer."""
    inner = optimizer
    while not isinstance(inner, FriendlySAM) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, FriendlySAM):
        raise TypeError(
            "optimizer must be a fsam_fused FriendlySAM or SAM, or the optimizer that "
            f"accelerator.prepare returned for one; got {type(optimizer).__name__}"
        )
    return inner


def _check_gradients_complete(accelerator: Any, call: str) -> None:
    if not accelerator.sync_gradients:
        raise RuntimeError(
            f"{call}() was called inside an accumulation window: the gradients of this pass are "
            "not complete until the last of its gradient_accumulation_steps micro-batches has run "
            "(accelerator.sync_gradients is False); run every micro-batch of the pass under "
            f"accelerator.accumulate(model) first, then call {call}()"
        )


def first_step(accelerator: Any, optimizer: Any) -> None:
    """Perturb the weights from the first pass's gradients (``w <- w + e``) and zero them.

    Call it after the first forward/backward (``accelerator.backward``) of every micro-batch.
    """
    _check_gradients_complete(accelerator, "first_step")
    unwrap(optimizer).first_step(zero_grad=True, grad_scaler=accelerator.scaler)


def second_step(accelerator: Any, optimizer: Any) -> None:
    """Restore the weights, take the base optimizer's step on the second pass's gradients, zero them.

    With fp16 it also updates the accelerator's GradScaler, as ``AcceleratedOptimizer.step``
    does; a step in which either pass overflowed is skipped whole.
    """
    _check_gradients_complete(accelerator, "second_step")
    unwrap(optimizer).second_step(zero_grad=True, grad_scaler=accelerator.scaler)
    if accelerator.scaler is not None:
        accelerator.scaler.update()
