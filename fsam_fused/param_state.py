"""``optimizer.state``: per-parameter entries whose edits the optimizer honours.

Entries hold views of the flat buffers (``momentum``, fp32, shaped like the parameter, and
``momentum_seeded``, a 0-dim flag), so in-place edits reach the kernels directly. Code
written for the authors' optimizer also *replaces* entries or tensors
(``state[p]["momentum"] = t``, ``del state[p]``, ``optimizer.state = {...}``, loading
tools that move state between devices): every such edit marks the mapping dirty, an O(1)
flag the optimizer reads at each step, and the next step copies what the entries hold into
the flat buffers (:meth:`ParamState.adopt`) before it runs. Rebuilding the buffers after a
parameter changed dtype or layout goes the same way: the entries still hold the old views,
and adopting them carries the momentum over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import distributed

if TYPE_CHECKING:
    from .state import FlatState

MOMENTUM = "momentum"
SEEDED = "momentum_seeded"


class _Dirty:
    """Marks the owning :class:`ParamState` dirty after each mutating call."""

    _owner: ParamState | None

    def _touch(self) -> None:
        if self._owner is not None:
            self._owner.dirty = True


def _mutator(name: str) -> Callable:
    def method(self, *args, **kwargs):
        result = getattr(dict, name)(self, *args, **kwargs)
        self._touch()
        return result

    method.__name__ = name
    return method


_MUTATORS = ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault")


class StateEntry(_Dirty, dict):
    """``optimizer.state[p]``: a dict; replacing or deleting a value takes effect at the next step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._owner = None
        dict.__init__(self, *args, **kwargs)


class Edits:
    """Whether a :class:`ParamState` was edited since the optimizer last adopted it.

    A plain object of its own, so traced code (``torch.compile``) can read the flag without
    touching the mapping, whose keys and values torch.compile would guard one by one.
    """

    def __init__(self) -> None:
        self.dirty = True


class ParamState(_Dirty, dict):
    """``optimizer.state``: like torch.optim's ``defaultdict(dict)``, with edits tracked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._owner = self
        self.edits = Edits()
        dict.__init__(self)
        self.update(*args, **kwargs)

    @property
    def dirty(self) -> bool:
        """Edited since the optimizer last adopted the entries (see :meth:`adopt`)."""
        return self.edits.dirty

    @dirty.setter
    def dirty(self, value: bool) -> None:
        self.edits.dirty = value

    def __missing__(self, key: Any) -> StateEntry:
        entry = StateEntry()
        entry._owner = self
        dict.__setitem__(self, key, entry)
        self.dirty = True
        return entry

    def __setitem__(self, key: Any, value: Any) -> None:
        entry = StateEntry(value)
        entry._owner = self
        dict.__setitem__(self, key, entry)
        self.dirty = True

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def adopt(self, params: Iterable[Tensor], flat: FlatState, describe: Callable[[Tensor], str]) -> None:
        """Copy what the entries of ``params`` hold into ``flat``'s slots, then point them at the slots.

        An entry without ``momentum`` leaves its parameter unseeded (its next step is plain
        SAM and seeds the momentum with the gradient, as in the authors' optimizer); one with
        ``momentum`` but no ``momentum_seeded`` (the authors' format) is seeded. Entries that
        still hold the views this slot handed out copy nothing and keep them. ``describe(p)``
        names a parameter in errors.
        """
        for p in params:
            entry = dict.get(self, p)
            # An entry of this mapping stays the same object: one a caller holds stays live.
            if not (isinstance(entry, StateEntry) and entry._owner is self):
                entry = StateEntry(entry if entry is not None else {})
                entry._owner = self
            if flat.with_momentum:
                self._adopt_momentum(p, entry, flat, describe)
            dict.__setitem__(self, p, entry)
        self.dirty = False

    @staticmethod
    def _adopt_momentum(
        p: Tensor, entry: StateEntry, flat: FlatState, describe: Callable[[Tensor], str]
    ) -> None:
        slot, seeded = flat.momentum(p), flat.seeded(p)
        given = entry.get(MOMENTUM)
        if given is None:
            slot.zero_()
            seeded.zero_()
            dict.__setitem__(entry, SEEDED, seeded)
        else:
            given = distributed.local_tensor(entry[MOMENTUM])
            if not isinstance(given, Tensor) or given.shape != slot.shape:
                shape = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
                raise ValueError(
                    f"optimizer.state[p]['momentum'] of {describe(p)} holds {shape}, but the "
                    f"parameter's local shape is {tuple(slot.shape)}; assign a tensor of that shape, "
                    "or delete the entry (del optimizer.state[p]) to start its momentum afresh"
                )
            flag = entry.get(SEEDED, 1.0)
            own_flag = isinstance(flag, Tensor) and _same_memory(flag, seeded)
            if not own_flag:
                seeded.copy_(torch.as_tensor(flag, dtype=torch.float32))
                dict.__setitem__(entry, SEEDED, seeded)
            if _same_memory(given, slot):
                return  # the alias this slot handed out, still over the slot
            slot.copy_(given)
            if own_flag:
                # A momentum assigned to an entry whose flag was not (a parameter with no gradient
                # yet: its slot unseeded) takes effect at the next step, as a whole new entry does;
                # an unseeded slot would have the kernels and the reference disagree on it.
                seeded.fill_(1.0)
        # An alias of the slot, never the view the plans hold: ``.data = t`` on what users see
        # must not reach a kernel (the scan watches it, and the next step adopts t instead).
        dict.__setitem__(entry, MOMENTUM, distributed.like_param(slot.detach(), p))


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a is b or (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


for _name in _MUTATORS:
    setattr(StateEntry, _name, _mutator(_name))
    if _name not in ParamState.__dict__:  # __setitem__ and update wrap values in entries themselves
        setattr(ParamState, _name, _mutator(_name))
