"""Keep BatchNorm running statistics out of the second (perturbed) forward pass.

SAM-style training runs two forward passes per batch; the second one, at ``p + e``,
should not move the running mean and variance a second time. While disabled, each
BatchNorm layer in training mode still normalises with the batch statistics, exactly as
before, but updates neither its running statistics nor ``num_batches_tracked``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_SAVED = "_fsam_fused_track_running_stats"


def disable_running_stats(model: nn.Module) -> None:
    """Stop every BatchNorm layer in ``model`` from updating its running statistics."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not hasattr(module, _SAVED):
            setattr(module, _SAVED, module.track_running_stats)
            module.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` (layers that never tracked stay as they were)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and hasattr(module, _SAVED):
            module.track_running_stats = getattr(module, _SAVED)
            delattr(module, _SAVED)


@contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager form: ``with running_stats_frozen(model): loss_fn(model(x), y).backward()``."""
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
