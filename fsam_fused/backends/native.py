"""The ``native`` backend: the compiled C++/CUDA ops of csrc/ (``torch.ops.fsam_fused``).

Each of the three ops is one call over the whole plan; the CPU ops are multi-threaded
and the CUDA ops are multi-tensor launches. Importing this module raises ImportError
when the extension is not built, which the registry reads as "not available".
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops
from ..plan import DevicePlan

name = "native"
device_types = {"cpu", "cuda"} if _ops.has_cuda_kernels() else {"cpu"}

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(dtype: torch.dtype) -> bool:
    """fp32, bf16 and fp16 parameters; the optimizer sends others to the torch backend."""
    return dtype in _DTYPES


def _momentum(plan: DevicePlan) -> list[Tensor]:
    # The ops take an empty list for "no momentum" (SAM); cached so each step reuses it.
    cached = plan.cache.get(name)
    if cached is None:
        cached = plan.cache[name] = list(plan.momentum) if plan.momentum is not None else []
    return cached


def sq_norm(plan: DevicePlan) -> Tensor:
    """``sum ||a * d||^2`` over the plan, as an fp32 0-dim tensor on its device."""
    return _ops.sq_norm(plan.params, plan.grads, _momentum(plan), plan.coef, plan.inv_scale)


def perturb_(plan: DevicePlan, total_sq_norm: Tensor) -> None:
    """EMA of the momentum, ``backup <- p`` and ``p <- p + e`` in one pass; a no-op for p and m
    when ``total_sq_norm`` is not finite."""
    momentum = _momentum(plan)
    _ops.perturb_(
        plan.params, plan.grads, momentum, plan.backup, plan.coef, total_sq_norm, plan.eps, plan.inv_scale
    )


def restore_(plan: DevicePlan) -> None:
    """``p <- backup``, a bit-exact copy in place."""
    _ops.restore_(plan.params, plan.backup)
