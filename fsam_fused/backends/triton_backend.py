"""The ``triton`` backend: the three ops of DESIGN.md section 2 as Triton kernels.

The kernels live in ``kernels/`` (installed as ``fsam_fused.kernels``). Per plan this
module keeps a :class:`~fsam_fused.kernels.PlanArrays` in ``plan.cache["triton"]``:
the address table and block maps are built on the first step, and afterwards the only
per-step host work is comparing the gradients' addresses (from the scan, no tensor object per
gradient) with the previous step's.

The gradients' addresses are checked in ``sq_norm``, which the optimizer always runs
before ``perturb_`` in the same step. Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set
before import, on CPU tensors instead (the interpreter reads the address tables as host
memory, so CUDA tensors cannot go through it).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import kernels  # kernels/, mapped to fsam_fused.kernels by setup.py (editable installs too)
from ..plan import DevicePlan

name = "triton"

device_types = {"cpu"} if kernels.INTERPRETED else {"cuda"}


def supports(dtype: torch.dtype) -> bool:
    """fp32, bf16 and fp16 parameters."""
    return dtype in kernels.ELEMENT_TYPES


def _arrays(plan: DevicePlan) -> kernels.PlanArrays:
    arrays = plan.cache.get(name)
    if arrays is None:
        arrays = kernels.PlanArrays(plan.params, plan.grad_list(), plan.momentum, plan.backup)
        plan.cache[name] = arrays
    return arrays


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, so make it the plan's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def sq_norm(plan: DevicePlan) -> Tensor:
    """``sum ||a * d||^2`` over the plan, as an fp32 0-dim tensor on its device."""
    arrays = _arrays(plan)
    arrays.use_grads(plan.grad_addresses())
    out = torch.empty((), dtype=torch.float32, device=plan.device)
    with _on(plan.device):
        kernels.sq_norm(arrays, _coef(plan), plan.inv_scale, out)
    return out


def perturb_(plan: DevicePlan, total_sq_norm: Tensor) -> None:
    """EMA update of the momentum, ``backup <- p`` and ``p <- p + e``; a no-op for ``p`` and
    ``m`` when ``total_sq_norm`` is not finite (the backup is written either way)."""
    arrays = _arrays(plan)
    total = total_sq_norm.to(device=plan.device, dtype=torch.float32)
    with _on(plan.device):
        kernels.perturb_(arrays, _coef(plan), plan.inv_scale, total, plan.eps)


def restore_(plan: DevicePlan) -> None:
    """``p <- backup``, a bit-exact copy in place."""
    with _on(plan.device):
        kernels.restore_(_arrays(plan))


def _coef(plan: DevicePlan) -> Tensor:
    assert plan.coef is not None and plan.coef.is_contiguous(), "the kernels read coef as a dense table"
    return plan.coef
