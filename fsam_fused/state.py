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

The buffers are laid out for the parameters as they were when the state was built
(:func:`layout_of`: device, dtype, shape, strides). :class:`FlatState` rebuilds a device's
state when one of its parameters no longer matches (``model.half()``, a layout change,
``p.data = ...`` of another dtype), and the momentum carries over through the
per-parameter views (see :mod:`fsam_fused.param_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed

if TYPE_CHECKING:
    from .param_state import ParamState


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


Layout = tuple[torch.device, torch.dtype, tuple[int, ...], tuple[int, ...]]


def layout_of(t: Tensor) -> Layout:
    """What the flat buffers of ``t``'s slot depend on: device, dtype, shape and strides."""
    return (t.device, t.dtype, tuple(t.shape), t.stride())


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
    """Flat state buffers for the (local parts of the) parameters of one device.

    ``momentum`` is fp32 and zero until a parameter's first finite step seeds it;
    ``seeded`` holds one fp32 flag (0 or 1) per slot, kept on the device so that a
    skipped (non-finite) step can leave a parameter unseeded without a host sync.
    The backup buffers are allocated on first use (the reference backend keeps its own
    copies), and so is the shared fp32 scratch of the torch backend.
    """

    def __init__(self, params: list[Tensor], *, with_momentum: bool) -> None:
        assert params, "a DeviceState needs at least one parameter"
        self.device = params[0].device
        self.params = params
        self.layouts = [layout_of(p) for p in params]
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
        self._backup: list[Tensor] | None = None
        self.backup_flat: dict[torch.dtype, Tensor] = {}
        self._scratch: dict[int, Tensor] = {}

    @property
    def backup(self) -> list[Tensor]:
        """Per-parameter backup views, in each parameter's own dtype so that restoring is a copy."""
        if self._backup is None:
            offsets: dict[Tensor, int] = {}
            for dtype in dict.fromkeys(p.dtype for p in self.params):
                same = [p for p in self.params if p.dtype == dtype]
                slots, numel = slot_offsets([p.numel() for p in same], same[0].element_size())
                self.backup_flat[dtype] = torch.empty(numel, dtype=dtype, device=self.device)
                offsets.update(zip(same, slots))
            self._backup = [view_like(self.backup_flat[p.dtype], offsets[p], p) for p in self.params]
        return self._backup

    def scratch(self, numel: int, index: int = 0) -> Tensor:
        """Flat fp32 work buffer ``index``, of at least ``numel`` elements, shared by every plan
        of this device (only one plan per backend runs at a time); sized for all its parameters
        on first use, so it is allocated once."""
        buffer = self._scratch.get(index)
        if buffer is None or buffer.numel() < numel:
            total = sum(p.numel() for p in self.params)
            buffer = self._scratch[index] = torch.empty(
                max(numel, total), dtype=torch.float32, device=self.device
            )
        return buffer

    def matches(self, params: list[Tensor]) -> bool:
        """Whether this state was built for exactly ``params``, as they are laid out now.

        A plain parameter is its own local part, so a new storage of the same layout
        (``p.data = p.data.clone()``) still matches: the kernels reach it through ``p``. The
        local part of a DTensor is a new view at every call, which matches while it shares
        the recorded view's memory.
        """
        return len(params) == len(self.params) and all(
            (p is q or p.data_ptr() == q.data_ptr()) and layout_of(p) == layout
            for p, q, layout in zip(params, self.params, self.layouts)
        )

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


def checked_parameters(lists: Sequence[Sequence[Tensor]]) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """The parameters of the param groups' lists, in order, their local parts (a DTensor's
    shard, else the parameter) and each one's group index; refuses what the state cannot hold."""
    params, local_parts, group_of = [], [], []
    for g, group_params in enumerate(lists):
        for i, p in enumerate(group_params):
            if not isinstance(p, Tensor) or not p.dtype.is_floating_point or p.is_complex():
                raise ValueError(
                    f"parameter {i} of param group {g} must be a real floating-point tensor, "
                    f"got {p.dtype if isinstance(p, Tensor) else type(p).__name__}"
                )
            local = distributed.local_tensor(p)
            if not is_dense(local):
                raise ValueError(
                    f"parameter {i} of param group {g} must be dense (contiguous or a permutation of "
                    f"contiguous, such as channels_last); got shape {tuple(p.shape)} strides {p.stride()}"
                )
            params.append(p)
            local_parts.append(local)
            group_of.append(g)
    _refuse_shared_memory(params, local_parts, lists)
    return params, local_parts, group_of


def _refuse_shared_memory(
    params: list[Tensor], local_parts: list[Tensor], lists: Sequence[Sequence[Tensor]]
) -> None:
    """A parameter reached twice (listed in two groups, or two Parameters over one memory) would be
    backed up a second time after its perturbation, and second_step would leave part of it."""
    # (Dense parts, checked above, cover one block of memory each; views of a flat buffer do not
    # overlap. Addresses compare within a device only.)
    extents = sorted(
        (str(t.device), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), k)
        for k, t in enumerate(local_parts)
        if t.numel() and t.device.type != "meta"
    )
    reach: tuple[str, int, int] = ("", 0, -1)  # (device, end, index) of the furthest block so far
    for device, start, end, k in extents:
        if device == reach[0] and start < reach[1]:
            places = [(g, i) for g, ps in enumerate(lists) for i in range(len(ps))]
            (ga, ia), (gb, ib) = sorted((places[reach[2]], places[k]))
            what = "the same parameter" if params[reach[2]] is params[k] else "in the same memory"
            raise ValueError(
                f"parameter {ia} of param group {ga} and parameter {ib} of param group {gb} are {what}: "
                "list each parameter once, in one group (each would be backed up after the other's "
                "perturbation, and second_step would leave part of it in the weights)"
            )
        if device != reach[0] or end > reach[1]:
            reach = (device, end, k)


class FlatState:
    """The device states of one optimizer, kept in step with its parameters.

    Args:
        with_momentum: False for SAM, which keeps no momentum.
    """

    def __init__(self, *, with_momentum: bool) -> None:
        self.with_momentum = with_momentum
        # The process groups the squared norm of the local parts is summed over (distributed.py).
        self.norm_groups: tuple[dist.ProcessGroup, ...] = ()
        self.devices: dict[torch.device, DeviceState] = {}
        self.location: dict[Tensor, tuple[DeviceState, int]] = {}
        # The same, by position in the optimizer's parameter order: traced code (torch.compile)
        # looks slots up here, since a dict keyed by tensors makes its guards fragile.
        self.slots: list[tuple[torch.device, int]] = []
        self.params: list[Tensor] = []
        # The momentum tensors handed to the last scan to watch, with their data pointers then.
        self._handed_out: list[tuple[Tensor, int]] = []

    def sync(self, params: list[Tensor], local_parts: list[Tensor]) -> bool:
        """Rebuild the device states that no longer fit ``params`` (whose local parts are
        ``local_parts``): a parameter added, removed, moved to another device, or of another
        dtype, shape or memory layout. Returns True when anything was rebuilt; the caller then
        carries the momentum over (:meth:`ParamState.adopt`).
        """
        by_device: dict[torch.device, list[Tensor]] = {}
        for local in local_parts:
            by_device.setdefault(local.device, []).append(local)
        # New members over old members' storage (``nn.Parameter(p.data)``) keep the buffers but
        # are other keys: their entries, and so their momentum, are their own.
        same_members = len(params) == len(self.params) and all(p is q for p, q in zip(params, self.params))
        rebuilt = not same_members or set(by_device) != set(self.devices)
        devices = {}
        for device, locals_ in by_device.items():
            state = self.devices.get(device)
            if state is None or not state.matches(locals_):
                state = DeviceState(locals_, with_momentum=self.with_momentum)
                rebuilt = True
            elif not same_members:
                state.params = locals_  # the plans reach the parameters through these
            devices[device] = state
        if rebuilt:
            self.devices = devices
            self.location = {}
            self.slots = []
            self.params = list(params)
            next_slot = dict.fromkeys(devices, 0)
            for p, local in zip(params, local_parts):
                self.location[p] = (devices[local.device], next_slot[local.device])
                self.slots.append((local.device, next_slot[local.device]))
                next_slot[local.device] += 1
        return rebuilt

    def update(
        self,
        params: list[Tensor],
        local_parts: list[Tensor],
        param_state: ParamState,
        describe: Callable[[Tensor], str],
        process_group: dist.ProcessGroup | None,
    ) -> bool:
        """Bring the buffers and ``param_state`` (``optimizer.state``) up to date with the
        parameters; True when buffers were rebuilt (the momentum carried over)."""
        rebuilt = self.sync(params, local_parts)
        if rebuilt:
            self.norm_groups = distributed.norm_groups(params, process_group)
        # New slots carry the momentum over from the entries, and a momentum tensor whose storage
        # was replaced (``.data = t``, which the scan notices) is adopted; a re-plan for a new
        # participation pattern, the entries untouched, walks none of them.
        if rebuilt or param_state.dirty or self._handed_out_moved():
            param_state.adopt(params, self, describe)  # clears dirty once all succeeded
            tensors = [dict.get(param_state, p)["momentum"] for p in params] if self.with_momentum else []
            self._handed_out = [(t, distributed.local_tensor(t).data_ptr()) for t in tensors]
        return rebuilt

    def _handed_out_moved(self) -> bool:
        return any(distributed.local_tensor(t).data_ptr() != ptr for t, ptr in self._handed_out)

    def watched(self) -> list[Tensor]:
        """The momentum tensors that ``optimizer.state`` handed out at the last adoption, for the
        scan to watch (see Scan.watch)."""
        return [t for t, _ in self._handed_out]

    def momentum(self, p: Tensor) -> Tensor | None:
        """The momentum view of parameter ``p``'s slot (of its local part), or None for SAM."""
        state, slot = self.location[p]
        return state.momentum[slot] if state.momentum is not None else None

    def seeded(self, p: Tensor) -> Tensor:
        """The 0-dim view of ``p``'s seeded flag."""
        state, slot = self.location[p]
        return state.seeded[slot]
