"""The ``torch`` backend: the three ops of DESIGN.md section 2 with ``torch._foreach_*``.

Works on every device and floating dtype. Hyperparameters are read from the plan's
device table (``coef``), except whether a group is adaptive or Fisher, which decides which
ops run. The direction
``d`` lives in a flat fp32 work buffer (the device state's scratch, allocated once and
shared by every plan of the device, so memory stays flat whatever the participation); the
plan lays its tensors out densely at the buffer's start, so the flat prefix can be made
harmless with a single ``where`` when the step is not finite (``0 * inf`` is NaN, so
scaling by a zero flag alone would not protect parameters or momentum).

The EMA is written in terms of ``d`` so that the raw gradient need not be kept:
``lmbda*m + (1-lmbda)*g = (lmbda + (1-lmbda)*sigma)*m + (1-lmbda)*d`` since
``g = d + sigma*m``. Passes over memory per fp32 element: copy g (8 B), subtract
sigma*m (12), norm (4), sanitise d (8), backup (8), EMA (8 + 12), perturb (12),
restore (8).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..plan import ADAPTIVE_ETA, FISHER_ETA, LMBDA, RHO, SIGMA, DevicePlan
from ..state import view_like

name = "torch"
device_types = None  # every device torch supports

_FP32_MAX = torch.finfo(torch.float32).max


def supports(dtype: torch.dtype) -> bool:
    """Every real floating dtype."""
    return dtype.is_floating_point


def _views(plan: DevicePlan, buffer: int) -> tuple[Tensor, list[Tensor]]:
    """A dense prefix of one of the device's fp32 scratch buffers, and its per-tensor views.

    Buffer 0 holds the direction ``d`` from ``sq_norm`` to ``perturb_``; buffer 1 Fisher SAM's
    ``f = 1 + fisher_eta * g^2`` (allocated only when a Fisher group runs here; each op
    works it out afresh).
    """
    key = f"{name}.{buffer}"
    cached = plan.cache.get(key)
    if cached is None:
        numel = sum(p.numel() for p in plan.params)
        flat = plan.state.scratch(numel, buffer)[:numel]
        views, offset = [], 0
        for p in plan.params:
            views.append(view_like(flat, offset, p))
            offset += p.numel()
        cached = plan.cache[key] = (flat, views)
    return cached


def _pick(items: list[Tensor], positions: list[int]) -> list[Tensor]:
    return [items[i] for i in positions]


def _scalars(plan: DevicePlan, values: Tensor) -> list[Tensor]:
    """``values`` (fp32, one per tensor of the plan) as the per-tensor 0-dim device scalars the
    foreach ops take: read on the device, never the host.

    In eager mode they are the views of one row the plan keeps, made on its first step, into
    which ``values`` is copied: making n views costs about a microsecond each on the CPU (an
    unbind of 4000 took 4.5 ms under cProfile), four times a step. The list is only valid until
    the next call (which rewrites the row); each op that reads it is queued before then, and the
    device runs the copy after it."""
    if torch.compiler.is_compiling():
        return list(values.unbind())
    cached = plan.cache.get(f"{name}.scalars")
    if cached is None:
        row = torch.empty(len(plan.params), dtype=torch.float32, device=plan.device)
        cached = plan.cache[f"{name}.scalars"] = (row, list(row.unbind()))
    row, views = cached
    row.copy_(values)
    return views


def _has_fp64(plan: DevicePlan) -> bool:
    """Whether the plan holds fp64 parameters (kept in eager mode: a step's loop over the tensors
    is what this backend's fp32 plans never pay; traced code, which asks once, keeps nothing)."""
    if torch.compiler.is_compiling():
        return any(p.dtype == torch.float64 for p in plan.params)
    has = plan.cache.get(f"{name}.has_fp64")
    if has is None:
        has = plan.cache[f"{name}.has_fp64"] = any(p.dtype == torch.float64 for p in plan.params)
    return has


def _column(plan: DevicePlan, column: int, positions: list[int]) -> list[Tensor]:
    """Per-tensor 0-dim device scalars of one coef column (see :func:`_scalars`)."""
    return _pick(_scalars(plan, plan.coef[:, column]), positions)


def _adaptive_weights(plan: DevicePlan, positions: list[int]) -> list[Tensor]:
    """``|p| + adaptive_eta`` of the tensors at ``positions``, in fp32 whatever the parameters'
    dtype, except fp64 for fp64 parameters (which only this backend and the tests' fp64 oracle
    take; the kernels and the reference form it in fp32)."""
    params = [
        p if p.dtype in (torch.float32, torch.float64) else p.float() for p in _pick(plan.params, positions)
    ]
    return torch._foreach_add(torch._foreach_abs(params), _column(plan, ADAPTIVE_ETA, positions))


def _fisher(plan: DevicePlan, positions: list[int]) -> list[Tensor]:
    """``f = 1 + fisher_eta * g^2`` of the tensors at ``positions``, from the raw (unscaled)
    gradient: in the second scratch buffer, or in temporaries inside ``torch.compile`` (where a
    view of the buffer made for the first time cannot be traced)."""
    grads = _pick(plan.grad_list(), positions)
    if torch.compiler.is_compiling():
        # A copy: .float() of an fp32 gradient is the gradient itself, which the in-place ops below
        # would square (the base step, or a plain step's, then read it).
        f = [g.to(torch.float32, copy=True) for g in grads]
    else:
        f = _pick(_views(plan, 1)[1], positions)
        torch._foreach_copy_(f, grads)
    if plan.inv_scale is not None:
        torch._foreach_mul_(f, plan.inv_scale)
    torch._foreach_mul_(f, f)
    torch._foreach_mul_(f, _column(plan, FISHER_ETA, positions))
    torch._foreach_add_(f, 1.0)
    return f


def sq_norm(plan: DevicePlan) -> Tensor:
    """``sum ||T * d||^2`` over the plan, as an fp32 0-dim tensor on its device."""
    flat, d = _views(plan, 0)
    torch._foreach_copy_(d, plan.grad_list())
    if plan.inv_scale is not None:
        flat.mul_(plan.inv_scale)
    if plan.momentum is not None:
        # sigma is read from the device table, so a schedule needs no new CUDA graph.
        torch._foreach_addcmul_(d, plan.momentum, _scalars(plan, -plan.coef[:, SIGMA]))
    norms = []
    for group, positions in plan.group_positions:
        d_group = _pick(d, positions)
        if plan.group_adaptive[group]:
            d_group = torch._foreach_mul(d_group, _adaptive_weights(plan, positions))
        if plan.group_fisher[group]:
            # sqrt((a d)^2 / f), not a d / sqrt(f): a squared direction beyond fp32 makes the step
            # non-finite, as in SAM, also where f overflows too (the kernels form it the same way).
            squares = torch._foreach_mul(d_group, d_group)
            if _has_fp64(plan):  # fp64 weights form fp64 squares: beyond fp32 they overflow as in fp32
                for s in squares:
                    if s.dtype == torch.float64:
                        s.masked_fill_(s > _FP32_MAX, math.inf)
            d_group = torch._foreach_sqrt(torch._foreach_div(squares, _fisher(plan, positions)))
        norms.extend(torch._foreach_norm(d_group))
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=plan.device)
    # fp32 whatever the parameters' dtype (|p| of an fp64 parameter promotes the norms).
    return torch.stack(norms).square().sum().float()


def perturb_(plan: DevicePlan, total_sq_norm: Tensor) -> None:
    """EMA update of the momentum, ``backup <- p`` and ``p <- p + e``, all on the device.

    A non-finite ``total_sq_norm`` turns the step into a no-op for parameters and
    momentum (the backup is still written, so ``restore_`` stays unconditional).
    """
    flat, d = _views(plan, 0)
    step_ok = torch.isfinite(total_sq_norm)
    torch.where(step_ok, flat, flat.new_zeros(()), out=flat)
    # A where, not step_ok / norm: 0 / NaN is NaN.
    inv_norm = torch.where(step_ok, 1.0 / (total_sq_norm.sqrt() + plan.eps), 0.0)
    torch._foreach_copy_(plan.backup, plan.params)
    if plan.momentum is not None:
        lmbda, sigma = plan.coef[:, LMBDA], plan.coef[:, SIGMA]
        keep = torch.where(step_ok, lmbda + (1.0 - lmbda) * sigma, 1.0)
        take = (1.0 - lmbda) * step_ok
        torch._foreach_mul_(plan.momentum, _scalars(plan, keep))
        torch._foreach_addcmul_(plan.momentum, d, _scalars(plan, take))
    for group, positions in plan.group_positions:
        d_group = _pick(d, positions)
        if plan.group_adaptive[group]:
            weights = _adaptive_weights(plan, positions)
            torch._foreach_mul_(d_group, weights)
            torch._foreach_mul_(d_group, weights)
        if plan.group_fisher[group]:
            torch._foreach_div_(d_group, _fisher(plan, positions))
    if any(plan.group_fisher):  # f of a non-finite gradient is NaN, and d / NaN is NaN
        torch.where(step_ok, flat, flat.new_zeros(()), out=flat)
    torch._foreach_addcmul_(plan.params, d, _scalars(plan, inv_norm * plan.coef[:, RHO]))


def restore_(plan: DevicePlan) -> None:
    """``p <- backup``, a bit-exact copy in place."""
    torch._foreach_copy_(plan.params, plan.backup)
