"""Per-device optimizer state kept in flat buffers.

Every parameter on a device owns a *slot*: a fixed range of a flat fp32 momentum buffer
and of a flat backup buffer in the parameter's dtype. The per-parameter tensors that
users and ``state_dict`` see are views of those ranges, shaped and strided like the
parameter, so one kernel launch can walk the whole model while checkpoints keep the
per-parameter layout of the authors' optimizer.

Each slot starts on a :data:`SLOT_ALIGNMENT`-byte boundary: the CUDA and Triton kernels
read a tensor with 16-byte vector loads only when every address they touch is aligned,
so one odd-sized parameter (a 10-class bias) must not push every later slot off the
boundary and onto the scalar path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers its storage range without gaps or overlaps.

    Such a tensor (contiguous, channels_last, any permutation of a contiguous tensor)
    can be processed as flat memory, and a buffer laid out in the same memory order
    can be viewed with the same strides.
    """
    if t.numel() <= 1:
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


SLOT_ALIGNMENT = 16


def slot_offsets(numels: list[int], element_size: int) -> tuple[list[int], int]:
    """Start of each slot, in elements, and the buffer length for slots of ``numels``.

    Every start is a multiple of :data:`SLOT_ALIGNMENT` bytes; the gaps are never read.
    """
    step = max(1, SLOT_ALIGNMENT // element_size)
    offsets = []
    total = 0
    for numel in numels:
        offsets.append(total)
        total += -(-numel // step) * step
    return offsets, total


def view_like(flat: Tensor, offset: int, like: Tensor) -> Tensor:
    """A view of ``flat[offset:offset + like.numel()]`` with ``like``'s shape and strides."""
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)


class DeviceState:
    """Flat state buffers for the parameters of one device.

    ``momentum`` is fp32 and zero until a parameter's first finite step seeds it;
    ``seeded`` holds one fp32 flag (0 or 1) per slot, kept on the device so that a
    skipped (non-finite) step can leave a parameter unseeded without a host sync.
    """

    def __init__(self, params: list[Tensor], *, with_momentum: bool) -> None:
        assert params, "a DeviceState needs at least one parameter"
        self.device = params[0].device
        self.params = params
        self.slot_of = {p: i for i, p in enumerate(params)}
        momentum_offsets, momentum_numel = slot_offsets([p.numel() for p in params], 4)
        self.momentum_flat = (
            torch.zeros(momentum_numel, dtype=torch.float32, device=self.device) if with_momentum else None
        )
        self.seeded = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        self.momentum = (
            [view_like(self.momentum_flat, o, p) for p, o in zip(params, momentum_offsets)]
            if self.momentum_flat is not None
            else None
        )
        # The backup is kept in each parameter's own dtype so that restoring is a copy.
        self.backup_flat: dict[torch.dtype, Tensor] = {}
        backup_offsets: dict[Tensor, int] = {}
        for dtype in dict.fromkeys(p.dtype for p in params):
            same = [p for p in params if p.dtype == dtype]
            offsets, numel = slot_offsets([p.numel() for p in same], same[0].element_size())
            self.backup_flat[dtype] = torch.empty(numel, dtype=dtype, device=self.device)
            backup_offsets.update(zip(same, offsets))
        self.backup = [view_like(self.backup_flat[p.dtype], backup_offsets[p], p) for p in params]

    def save_momentum(self) -> None:
        """Remember momentum and seeded flags, so a step can be taken back (see ``rollback_momentum``)."""
        if self.momentum_flat is None:
            return
        if not hasattr(self, "_saved_momentum"):
            self._saved_momentum = torch.empty_like(self.momentum_flat)
            self._saved_seeded = torch.empty_like(self.seeded)
        self._saved_momentum.copy_(self.momentum_flat)
        self._saved_seeded.copy_(self.seeded)

    def rollback_momentum(self, flag: Tensor) -> None:
        """Where ``flag`` (fp32 0-d, on this device) is 1, go back to the saved momentum; at 0, keep it.

        A lerp with weight 0 or 1 is exact either way (momentum is always finite), and
        needs neither a host read nor a temporary the size of the model.
        """
        if self.momentum_flat is None:
            return
        self.momentum_flat.lerp_(self._saved_momentum, flag)
        self.seeded.lerp_(self._saved_seeded, flag)
