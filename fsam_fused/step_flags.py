"""A plan's coefficient table and its tensors' seeded flags, refreshed around every step's kernels.

- :func:`gather_coef`: ``coef[i] = table[group_of[i]]``, with ``lmbda`` multiplied by the
  tensor's seeded flag (0 until a finite step seeded its momentum; :mod:`fsam_fused.plan` has
  the table) and, for a plain step, ``rho`` set to 0;
- :func:`finite_flags`: whether the step's squared norm is finite (``step_ok``) and its
  complement (``found_inf``), as fp32 flags on the device, never read by the host;
- :func:`mark_seeded`: a finite step seeds the momentum of the plan's tensors;
- :func:`count_skipped`: the optimizer's count of skipped (non-finite) steps.

Each is a few tensor ops, and that is what runs on every device other than the CPU and inside
``torch.compile``. On the CPU, with the extension built, plain loops (``csrc/host/step_flags.cpp``)
do the same work: there a dispatch costs more than the work itself (tens of microseconds each
once a forward and backward pass has evicted its code, about a millisecond a step for the dozen
ops here). The loops decline, and the ops run, under a Python dispatch or torch-function mode
(a tracer, FakeTensorMode, a logging mode), under ``torch.jit.trace``, or for a tensor that is
not plain contiguous CPU memory (a subclass, a functional or vmap wrapper, a negated view).
Both give the same values (tests/test_step_flags.py; the coefficients bit for bit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hparams import LMBDA, RHO

try:
    from . import _C as _extension
except ImportError:
    _extension = None


def _loops_may_run(t: Tensor) -> bool:
    # (Whoever watches the ops must see them: torch.compile, torch.jit.trace, a TorchFunctionMode.
    # A dispatch mode, and tensors the loops cannot read, the extension itself declines.)
    return (
        _extension is not None
        and t.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._is_torch_function_mode_enabled()
    )


def gather_coef(
    coef: Tensor,
    table: Tensor,
    group_of: Tensor,
    seeded: Tensor,
    slots: Tensor,
    selected: Tensor,
    *,
    plain: bool,
) -> None:
    """Write this step's coefficients into ``coef`` (fp32 ``[n, COEF_COLUMNS]``) from the group
    table; ``selected`` is an fp32 ``[n]`` scratch buffer on the same device (eager only)."""
    if _loops_may_run(coef) and _extension.gather_coef(
        coef, table, group_of, seeded, slots, LMBDA, RHO if plain else None
    ):
        return
    torch.index_select(table, 0, group_of, out=coef)
    torch.index_select(seeded, 0, slots, out=selected)
    coef.select(1, LMBDA).mul_(selected)
    if plain:
        coef.select(1, RHO).zero_()  # e = 0, the EMA as usual


def traced_coef(table: Tensor, group_of: Tensor, seeded: Tensor, slots: Tensor, *, plain: bool) -> Tensor:
    """:func:`gather_coef` inside ``torch.compile``: a new tensor, no buffer written in place."""
    coef = table.index_select(0, group_of)
    coef[:, LMBDA] *= seeded.index_select(0, slots)
    if plain:
        coef[:, RHO] = 0.0
    return coef


def finite_flags(total: Tensor) -> tuple[Tensor, Tensor]:
    """``(step_ok, found_inf)``: fp32 0-dim flags on ``total``'s device, ``(1, 0)`` where the
    squared norm ``total`` is finite, ``(0, 1)`` where it is not."""
    if _loops_may_run(total):
        flags = _extension.finite_flags(total)
        if flags is not None:
            return flags
    if torch.compiler.is_compiling():  # one fused kernel whatever the ops; a compiler may rewrite x - x
        step_ok = torch.isfinite(total)
        return step_ok.float(), (~step_ok).float()
    # Eager, total - total is exactly 0 where total is finite and nan where it is not: four
    # kernels on a GPU, where isfinite, its negation and two casts took seven.
    found_inf = (total - total).ne(0).float()
    return 1.0 - found_inf, found_inf


def mark_seeded(seeded: Tensor, slots: Tensor, step_ok: Tensor, selected: Tensor | None) -> None:
    """``seeded[slots] = max(seeded[slots], step_ok)`` (``step_ok``: an fp32 0-dim flag on the
    same device); ``selected``: an fp32 scratch buffer as long as ``slots`` (None when tracing)."""
    if torch.compiler.is_compiling() or selected is None:
        seeded.index_copy_(0, slots, torch.maximum(seeded.index_select(0, slots), step_ok))
        return
    if _loops_may_run(seeded) and _extension.mark_seeded(seeded, slots, step_ok):
        return
    torch.index_select(seeded, 0, slots, out=selected)
    torch.maximum(selected, step_ok, out=selected)
    seeded.index_copy_(0, slots, selected)


def count_skipped(counter: Tensor, found_inf: Tensor) -> None:
    """``counter += found_inf`` (fp32 0-dim; ``found_inf`` on any device)."""
    if (
        found_inf.device == counter.device
        and _loops_may_run(counter)
        and _extension.add_flag(counter, found_inf)
    ):
        return
    counter += found_inf.to(counter.device)
