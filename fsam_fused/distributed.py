"""F-SAM under ``torch.distributed``: DDP's two perturbation modes and sharded parameters.

Data parallel (DDP) training can perturb in two ways, and the choice changes the method:

* ``"per_worker"``: each rank perturbs with its own gradient and its own norm, as in the
  SAM paper's m-sharpness (the authors' multi-GPU runs do this). The first backward runs
  under ``model.no_sync()``; each rank's momentum follows its local gradients; the second
  backward is all-reduced, and since ``second_step`` restores the exact pre-step
  parameters, every rank applies the same update to the same values.
* ``"sync"``: the first backward is all-reduced as usual, so every rank holds the same
  gradient and computes the same perturbation, the same as one process on the whole batch.

:func:`first_pass` wraps the first forward and backward for either mode.

Sharded parameters (FSDP2 ``fully_shard``, other DTensor parameters, or shards that the
caller manages with an explicit ``process_group``) need one more thing: every rank holds
only part of each tensor, so the squared norm of the perturbation direction is summed over
the ranks that share the tensors. The optimizer works on the local shards and asks
:func:`norm_groups` which process groups to all-reduce that scalar over.

In per-worker mode the norms stay local, but the decision to skip a step for non-finite
gradients must not: pass the DDP group as ``replica_group`` to the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    from torch.distributed.tensor import DTensor
else:  # a torch build without distributed support has no DTensor parameters either
    DTensor = None

PER_WORKER = "per_worker"
SYNC = "sync"
MODES = (PER_WORKER, SYNC)


def is_dtensor(t: Tensor) -> bool:
    """True for a DTensor (a tensor whose values are spread over a device mesh)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` held by this rank, sharing its memory: ``t`` itself unless a DTensor."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():  # no autograd node: the fused ops write through this view
        return t.to_local()


def like_param(local: Tensor, param: Tensor) -> Tensor:
    """``local`` laid out over the same mesh as ``param`` (a DTensor) when ``param`` is one.

    Optimizer state exposed this way is what ``torch.distributed.checkpoint`` expects for
    DTensor parameters; the DTensor shares ``local``'s memory.
    """
    if not is_dtensor(param):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False
    )


def _sharded_mesh_groups(param: Tensor) -> tuple[dist.ProcessGroup, ...]:
    """The process groups of the mesh dimensions that ``param`` is sharded over."""
    groups = []
    for dim, placement in enumerate(param.placements):
        if placement.is_partial():
            raise ValueError(
                "parameters with a Partial placement hold unreduced values, so the norm of "
                "their gradient cannot be computed from the shards; redistribute them to "
                "Shard or Replicate placements before building the optimizer"
            )
        if placement.is_shard():
            groups.append(param.device_mesh.get_group(dim))
    return tuple(groups)


def norm_groups(
    params: Iterable[Tensor], process_group: dist.ProcessGroup | None = None
) -> tuple[dist.ProcessGroup, ...]:
    """The process groups over which the squared norm of the local shards is summed, in order.

    An explicit ``process_group`` wins: the caller says the parameters are split over its
    ranks (each element held by exactly one of them). Otherwise DTensor parameters name
    their groups: one per mesh dimension they are sharded over (a replicated dimension
    holds copies, which must not be counted twice). Plain tensors need no reduction: they
    are whole on every rank. All parameters must agree, since one scalar is reduced.
    """
    if process_group is not None:
        return (process_group,)
    # Keyed by member ranks: groups over the same ranks sum the same partial norms.
    found: dict[tuple[tuple[int, ...], ...], tuple[dist.ProcessGroup, ...]] = {}
    for p in params:
        groups = _sharded_mesh_groups(p) if is_dtensor(p) else ()
        found.setdefault(tuple(tuple(dist.get_process_group_ranks(g)) for g in groups), groups)
    if len(found) > 1:
        raise ValueError(
            "the parameters are sharded over different process groups (or some are sharded "
            "and some are not), so no single all-reduce sums the global norm; put them in "
            "one optimizer per sharding layout, or shard all of them the same way (e.g. "
            "fully_shard the root module too)"
        )
    return next(iter(found.values()), ())


def check_group(argument: str, group: object) -> None:
    """Raise ``TypeError`` unless ``group`` is None or a process group."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"{argument} must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD) or None, "
            f"got {type(group).__name__}"
        )


def all_reduce_sum_(total: Tensor, groups: Iterable[dist.ProcessGroup]) -> Tensor:
    """Sum the device scalar ``total`` over each group in turn, in place, without a host sync."""
    for group in groups:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def check_mode(mode: str) -> None:
    """Refuse a perturbation mode other than ``"sync"`` and ``"per_worker"``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@contextlib.contextmanager
def first_pass(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Run the first forward and backward of a SAM step for the chosen perturbation mode.

    Put both the forward and the backward inside (DDP decides at forward time whether
    the backward all-reduces)::

        with first_pass(ddp_model, mode="per_worker"):
            loss_fn(ddp_model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        loss_fn(ddp_model(x), y).backward()        # always all-reduced
        optimizer.second_step(zero_grad=True)

    Args:
        model: the DDP-wrapped model (or any module, for ``mode="sync"``).
        mode: ``"per_worker"`` (each rank perturbs with its own gradient: ``no_sync``) or
            ``"sync"`` (gradients all-reduced first: one perturbation on every rank).
    """
    check_mode(mode)
    if mode == SYNC:
        yield
        return
    no_sync: Any = getattr(model, "no_sync", None)
    if no_sync is None:
        raise TypeError(
            f"mode='per_worker' needs a model with no_sync() such as DistributedDataParallel, "
            f"got {type(model).__name__}; wrap the model in DDP, or use mode='sync'"
        )
    with no_sync():
        yield


def nonfinite_if_any_rank(total: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``total`` where every rank of ``group`` has a finite one, else NaN; no host sync.

    Ranks that perturb with their own norms must still agree on skipping a step, or the
    ones that step would leave the ones that skip behind. ``0 * sum`` is 0 when every
    rank's value is finite and NaN (``0 * inf``, ``0 * nan``) when one is not (or the sum
    overflows, which skips on every rank as well); adding exactly 0 leaves ``total`` as it is.
    """
    return total + 0.0 * all_reduce_sum_(total.clone(), (group,))
