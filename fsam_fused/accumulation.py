"""Gradient accumulation for a SAM step: k micro-batches, two passes over the same ones.

An accumulated SAM step is one SAM step on the whole batch, not k small SAM steps: the
first-pass gradients of all k micro-batches are summed at ``w``, the perturbation ``e`` is
computed once from that sum, and only then are the second-pass gradients summed at
``w + e``. Perturbing after every micro-batch (as some published accumulation scripts do)
leaves the weights perturbed between micro-batches and gives a different method.

Each micro-batch's loss is divided by k, so the summed gradient is the mean over the
batch when the micro-batches are equally large. Under DDP only the last micro-batch of a
pass all-reduces (the others run under ``no_sync``); with per-worker perturbation
(:func:`fsam_fused.distributed.first_pass`) the first pass never does. FSDP2 modules are
kept from reducing the same way, with ``set_requires_gradient_sync``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batchnorm import running_stats_frozen
from .distributed import PER_WORKER, SYNC, check_mode, first_pass
from .optimizer import FriendlySAM


def accumulated_step(
    optimizer: FriendlySAM,
    model: nn.Module,
    micro_batches: Sequence[Any],
    loss_of: Callable[[Any], Tensor],
    *,
    mode: str = SYNC,
    freeze_running_stats: bool = True,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    """One F-SAM (or SAM) step over ``micro_batches``, accumulating both passes' gradients; or,
    on the steps between SAM steps of an optimizer with ``sam_interval > 1`` (see its ``sam_due``),
    one pass and its ``plain_step``.

    Starts from zero gradients (it calls ``optimizer.zero_grad()``) and leaves them zeroed.
    ::

        micro_batches = list(zip(x.chunk(k), y.chunk(k)))
        loss = accumulated_step(optimizer, model, micro_batches, lambda b: loss_fn(model(b[0]), b[1]))

    Args:
        optimizer: the ``FriendlySAM`` or ``SAM`` optimizer (not a framework's wrapper of it).
        model: the module ``loss_of`` runs; the DDP- or FSDP2-wrapped one when distributed.
        micro_batches: the k micro-batches, a list or tuple: the second pass runs over them again.
        loss_of: the mean loss of one micro-batch (its forward pass); autocast goes inside.
        mode: the DDP perturbation mode, ``"sync"`` or ``"per_worker"``, as in
            :func:`fsam_fused.distributed.first_pass`.
        freeze_running_stats: keep BatchNorm's running statistics out of the second pass.
        grad_scaler: a ``torch.amp.GradScaler``: the losses are scaled, and the scaler is
            handed to both halves of the step; call ``grad_scaler.update()`` afterwards.

    Returns:
        The batch's first-pass loss (the mean over the micro-batches), detached.
    """
    if not isinstance(optimizer, FriendlySAM):
        raise TypeError(
            "optimizer must be a fsam_fused FriendlySAM or SAM, got "
            f"{type(optimizer).__name__}; pass the optimizer itself, not a framework's wrapper "
            "(Accelerate: prepared_optimizer.optimizer)"
        )
    if not isinstance(micro_batches, Sequence):
        raise TypeError(
            "micro_batches must be a list or tuple, since the second pass runs over the same "
            f"micro-batches again; got {type(micro_batches).__name__} (wrap it in list())"
        )
    if not micro_batches:
        raise ValueError("micro_batches is empty; pass at least one micro-batch")
    check_mode(mode)
    optimizer.zero_grad()
    if not optimizer.sam_due:  # (sam_interval > 1) one pass, and the base step on its gradient
        loss = _accumulate(model, micro_batches, loss_of, grad_scaler, sync_last=True)
        optimizer.plain_step(zero_grad=True, grad_scaler=grad_scaler)
        return loss
    with first_pass(model, mode):  # per-worker: the whole pass stays local
        loss = _accumulate(model, micro_batches, loss_of, grad_scaler, sync_last=mode != PER_WORKER)
    optimizer.first_step(zero_grad=True, grad_scaler=grad_scaler)
    frozen = running_stats_frozen(model) if freeze_running_stats else contextlib.nullcontext()
    with frozen:
        _accumulate(model, micro_batches, loss_of, grad_scaler, sync_last=True)
    optimizer.second_step(zero_grad=True, grad_scaler=grad_scaler)
    return loss


def _accumulate(
    model: nn.Module,
    micro_batches: Sequence[Any],
    loss_of: Callable[[Any], Tensor],
    grad_scaler: torch.amp.GradScaler | None,
    sync_last: bool,
) -> Tensor:
    """Sum the gradients of ``loss_of(b) / k`` over the micro-batches; their summed loss, detached."""
    k = len(micro_batches)
    losses = []
    for i, micro_batch in enumerate(micro_batches):
        with _gradient_sync(model, enabled=sync_last and i == k - 1):
            loss = loss_of(micro_batch) / k
            (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum()


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Let ``model``'s backward reduce gradients across ranks only if ``enabled``.

    DDP decides at forward time, so the forward and the backward both go inside.
    """
    if enabled:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # a single process: nothing to reduce
        yield
