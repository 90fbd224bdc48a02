"""The compiled ``torch.ops.fsam_fused`` operators, their Python wrappers and fake kernels.

Importing this module loads ``fsam_fused._C`` (which registers the ops, schemas in
csrc/ops.cpp) and raises ImportError when the extension was not built. The fake (meta)
implementations let ``torch.compile`` trace the ops without running them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C

__all__ = ["cuda_arch_list", "has_cuda_kernels", "perturb_", "restore_", "sq_norm"]

cuda_arch_list: str = _C.cuda_arch_list
"""The CUDA targets the extension was built for (``TORCH_CUDA_ARCH_LIST`` syntax); "" without CUDA."""


def has_cuda_kernels() -> bool:
    """Whether this build of the extension holds CUDA implementations of the ops (it was
    compiled for at least one CUDA target)."""
    return bool(cuda_arch_list)


def sq_norm(
    params: list[Tensor], grads: list[Tensor], momentum: list[Tensor], coef: Tensor, inv_scale: Tensor | None
) -> Tensor:
    """``sum ||a * d||^2`` over the lists, an fp32 0-d tensor (``momentum`` may be empty)."""
    return torch.ops.fsam_fused.sq_norm.default(params, grads, momentum, coef, inv_scale)


def perturb_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum: list[Tensor],
    backup: list[Tensor],
    coef: Tensor,
    total_sq_norm: Tensor,
    eps: float,
    inv_scale: Tensor | None,
) -> None:
    """``backup <- p``; if ``total_sq_norm`` is finite also the EMA of ``m`` and ``p <- p + e``."""
    torch.ops.fsam_fused.perturb_.default(
        params, grads, momentum, backup, coef, total_sq_norm, eps, inv_scale
    )


def restore_(params: list[Tensor], backup: list[Tensor]) -> None:
    """``p <- backup``, bit-exact. Empty lists are a no-op (the op itself needs a tensor to
    dispatch on)."""
    if params or backup:
        torch.ops.fsam_fused.restore_.default(params, backup)


@torch.library.register_fake("fsam_fused::sq_norm")
def _sq_norm_fake(params, grads, momentum, coef, inv_scale):
    return coef.new_empty(())


@torch.library.register_fake("fsam_fused::perturb_")
def _perturb_fake(params, grads, momentum, backup, coef, total_sq_norm, eps, inv_scale):
    return None


@torch.library.register_fake("fsam_fused::restore_")
def _restore_fake(params, backup):
    return None
