"""One training step of each method: plain SGD, SAM/F-SAM, and the two perturbation probes.

The probes come from the F-SAM paper's analysis (section 3 and appendix A5): where does SAM's
perturbation do its good? ``SAM-db`` perturbs along the gradient of another, independent
batch; ``SAM-full`` along the gradient of the whole training set. Both run on the same ``SAM``
optimizer: ``first_step`` perturbs along whatever gradient the loop computed into ``.grad``,
so a probe only changes which gradient that is. Running statistics (BatchNorm) move once per
step, on the step's own batch; the probes' extra passes leave them alone.

``loss_fn(model(inputs), targets)`` is the loss; every batch is an ``(inputs, targets)`` pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fsam_fused import SAM, FriendlySAM, running_stats_frozen

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


def sgd_step(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """The baseline: one forward/backward, one step."""
    inputs, targets = batch
    loss_fn(model(inputs), targets).backward()
    optimizer.step()
    optimizer.zero_grad()


def sam_step(model: nn.Module, loss_fn: LossFn, optimizer: FriendlySAM, batch: Batch) -> None:
    """SAM or F-SAM (the optimizer decides): perturb along this batch's gradient, then step
    with the gradient at the perturbed point."""
    inputs, targets = batch
    loss_fn(model(inputs), targets).backward()
    optimizer.first_step(zero_grad=True)
    with running_stats_frozen(model):
        loss_fn(model(inputs), targets).backward()
    optimizer.second_step(zero_grad=True)


def sam_db_step(model: nn.Module, loss_fn: LossFn, optimizer: SAM, batch: Batch, other_batch: Batch) -> None:
    """SAM-db: perturb along the gradient of ``other_batch``, an independent draw from the
    training set, then step with ``batch``'s gradient at the perturbed point."""
    inputs, targets = other_batch
    with running_stats_frozen(model):
        loss_fn(model(inputs), targets).backward()
    optimizer.first_step(zero_grad=True)
    inputs, targets = batch
    loss_fn(model(inputs), targets).backward()
    optimizer.second_step(zero_grad=True)


def sam_full_step(
    model: nn.Module, loss_fn: LossFn, optimizer: SAM, batch: Batch, full_data: Sequence[Batch]
) -> None:
    """SAM-full: perturb along the gradient of the mean loss over ``full_data`` (the whole
    training set, in chunks), then step with ``batch``'s gradient at the perturbed point."""
    total = sum(len(targets) for _, targets in full_data)
    with running_stats_frozen(model):
        for inputs, targets in full_data:
            (loss_fn(model(inputs), targets) * (len(targets) / total)).backward()
    optimizer.first_step(zero_grad=True)
    inputs, targets = batch
    loss_fn(model(inputs), targets).backward()
    optimizer.second_step(zero_grad=True)
