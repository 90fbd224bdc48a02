"""The ``native`` backend: the compiled C++/CUDA ops of csrc/ (``torch.ops.fsam_fused``).

Each of the three ops is one call over the whole plan; the CPU ops are multi-threaded
and the CUDA ops are multi-tensor launches. When the step's gradients come from the
compiled scan (the common case: plain tensor parameters, eager mode), the plan's lists live
on the C++ side (``fsam_fused._C.NativeLists``) and the ops are called there, so a step
converts no Python list of tensors; otherwise (Python scan, ``torch.compile``) the lists
go through ``torch.ops`` as usual. Both reach the same kernels. Importing this module
raises ImportError when the extension is not built, which the registry reads as "not
available".
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C, _ops
from ..plan import DevicePlan

name = "native"
device_types = {"cpu", "cuda"} if _ops.has_cuda_kernels() else {"cpu"}

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(dtype: torch.dtype) -> bool:
    """fp32, bf16 and fp16 parameters; the optimizer sends others to the torch backend."""
    return dtype in _DTYPES


def _lists(plan: DevicePlan, source: object | None = None) -> _C.NativeLists | None:
    """The plan's C++-side lists when this step's gradients are in the compiled scan (``source``,
    by default the plan's), else None."""
    source = plan.source if source is None else source
    if not isinstance(source, _C.ParamScan) or torch.compiler.is_compiling():
        return None
    lists = plan.cache.get(name)
    if lists is None:
        lists = plan.cache[name] = _C.NativeLists(
            plan.params, plan.momentum or [], plan.backup, plan.positions
        )
    return lists


def sq_norm(plan: DevicePlan) -> Tensor:
    """``sum ||a * d||^2`` over the plan, as an fp32 0-dim tensor on its device."""
    lists = _lists(plan)
    if lists is not None:
        return lists.sq_norm(plan.source, plan.coef, plan.inv_scale)
    return _ops.sq_norm(plan.params, plan.grad_list(), plan.momentum or [], plan.coef, plan.inv_scale)


def perturb_(plan: DevicePlan, total_sq_norm: Tensor) -> None:
    """EMA of the momentum, ``backup <- p`` and ``p <- p + e`` in one pass; a no-op for p and m
    when ``total_sq_norm`` is not finite."""
    lists = _lists(plan)
    if lists is not None:
        lists.perturb_(plan.source, plan.coef, total_sq_norm, plan.eps, plan.inv_scale)
        return
    _ops.perturb_(
        plan.params,
        plan.grad_list(),
        plan.momentum or [],
        plan.backup,
        plan.coef,
        total_sq_norm,
        plan.eps,
        plan.inv_scale,
    )


def first_pass_ready(plan: DevicePlan, scan: object) -> bool:
    """Whether :func:`first_pass` would run the kernels if ``scan`` sees no change (the kept CPU
    lists serve), so the caller attaches the plan only then."""
    lists = _lists(plan, scan)
    return lists is not None and lists.first_pass_ready(scan)


def first_pass(plan: DevicePlan, param_lists: list[list[Tensor]]) -> tuple[bool, Tensor | None]:
    """The scan (``plan.source``) of ``param_lists`` and, if it saw no change, ``sq_norm`` and
    ``perturb_`` with the squared norm they found, in one call (see ``NativeLists.first_pass``):
    for a step whose only plan this is, with no norm to reduce across processes, after
    :func:`first_pass_ready`. Returns whether the scan saw a change (then the caller re-plans), and
    the squared norm if the pass ran; with ``(False, None)`` the caller runs ``sq_norm`` and
    ``perturb_`` itself."""
    lists = _lists(plan)
    assert lists is not None, "first_pass after first_pass_ready"
    return lists.first_pass(plan.source, param_lists, plan.coef, plan.eps, plan.inv_scale)


def restore_(plan: DevicePlan) -> None:
    """``p <- backup``, a bit-exact copy in place."""
    lists = plan.cache.get(name)
    if lists is not None and not torch.compiler.is_compiling():
        lists.restore_()
        return
    _ops.restore_(plan.params, plan.backup)
