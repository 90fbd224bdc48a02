"""The Triton kernels as an :class:`tests.op_oracle.Ops`, for the interpreted and the GPU tests."""

from __future__ import annotations

import contextlib

import torch

from fsam_fused import backends
from tests.op_oracle import Lists


class TritonOps:
    """``fsam_fused.kernels`` on :class:`Lists`; the ``PlanArrays`` of the last lists is kept, as per plan."""

    def __init__(self) -> None:
        backend = backends._load("triton")
        assert backend is not None, "triton is not importable"
        self.kernels = backend.kernels
        self._lists: Lists | None = None

    def arrays(self, lists: Lists):
        if lists is not self._lists:
            self._lists = lists
            momentum = lists.momentum or None
            self._arrays = self.kernels.PlanArrays(lists.params, lists.grads, momentum, lists.backup)
        return self._arrays

    def _device(self, lists: Lists) -> contextlib.AbstractContextManager:
        device = lists.coef.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def sq_norm(self, lists: Lists) -> torch.Tensor:
        out = torch.full((), float("nan"), dtype=torch.float32, device=lists.coef.device)
        with self._device(lists):
            self.kernels.sq_norm(self.arrays(lists), lists.coef, lists.inv_scale, out)
        return out

    def perturb_(self, lists: Lists, total: torch.Tensor, eps: float) -> None:
        with self._device(lists):
            self.kernels.perturb_(self.arrays(lists), lists.coef, lists.inv_scale, total, eps)

    def restore_(self, lists: Lists) -> None:
        with self._device(lists):
            self.kernels.restore_(self.arrays(lists))
