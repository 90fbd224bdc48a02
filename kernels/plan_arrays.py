"""The device arrays the kernels read for one plan, built once and kept with the plan.

A plan's tensors are split by element type (one launch per op per type); each type's
chunks get a :class:`Segment` with its own block map and a slice of the shared buffer
of per-chunk partial sums. Only the gradient row of the tensor table changes between
steps, and only when the gradients moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

from ..upload import Staging, capturing
from .block_map import build_block_map
from .common import ELEMENT_TYPES
from .tensor_table import GRAD, addresses, build_table


@dataclass(frozen=True)
class Segment:
    """The tensors of one element type: their block map and slots in the partials buffer."""

    element: tl.dtype
    block_map: Tensor
    partials: slice

    @property
    def chunks(self) -> int:
        return self.block_map.shape[0]


class PlanArrays:
    """Tensor table, block maps and partials buffer for one list of tensors.

    Args:
        params, grads, backup: equally long lists; ``momentum`` too, or None.
    """

    def __init__(
        self, params: list[Tensor], grads: list[Tensor], momentum: list[Tensor] | None, backup: list[Tensor]
    ) -> None:
        assert params, "a plan has at least one tensor"
        device = params[0].device
        self.n = len(params)
        self.has_momentum = momentum is not None
        # Each device table keeps the pinned buffer it is uploaded from (see fsam_fused.upload).
        self._stagings = [Staging(), Staging()]
        self.table = build_table(params, grads, momentum, backup, self._stagings[0])
        self._grad_addresses = addresses(grads)
        self._captured = capturing(device)
        # The gradient row is next uploaded by itself when the gradients move, or in a capture.
        self._stagings[1].reserve(self.table[GRAD.value])
        numels = [p.numel() for p in params]
        by_type: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_type.setdefault(p.dtype, []).append(i)
        self.segments: list[Segment] = []
        offset = 0
        for dtype, indices in by_type.items():
            self._stagings.append(Staging())
            block_map = build_block_map(numels, indices, device, self._stagings[-1])
            chunks = block_map.shape[0]
            if chunks:
                self.segments.append(Segment(ELEMENT_TYPES[dtype], block_map, slice(offset, offset + chunks)))
            offset += chunks
        self.partials = torch.empty(offset, dtype=torch.float32, device=device)

    def use_grads(self, current: list[int]) -> None:
        """Point the table at the gradients at addresses ``current``; uploads only when one changed.

        Only addresses are kept, never the tensors: the optimizer holds no gradient after
        the step that used it.
        """
        # Once a step was recorded into a CUDA graph, each replay writes the recorded
        # addresses into the table behind the host's back, so from then on every eager
        # step uploads its own rather than trusting the host's record.
        self._captured = self._captured or capturing(self.table.device)
        if self._captured or current != self._grad_addresses:
            self._stagings[1].upload(current, self.table[GRAD.value])
            self._grad_addresses = current
