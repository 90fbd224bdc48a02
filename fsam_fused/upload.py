"""Copying small host tables (indices, addresses, hyperparameters) to a device without a sync.

A CUDA copy from pageable host memory makes the host wait for the device; one from pinned
memory with ``non_blocking=True`` does not. Every table the optimizer and its backends put on
a device goes through :class:`Staging`, which owns its pinned buffer: a buffer is rewritten
only after the device has finished reading it (an event recorded after each copy says when),
and a copy recorded into a CUDA graph keeps reading the buffer it was recorded with, so that
buffer is never rewritten afterwards. This does not rely on the caching host allocator's
bookkeeping, which differs between torch releases (in particular inside graph capture).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is being recorded into a CUDA graph right now."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def pinned(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A page-locked host tensor: the source a copy to the device can read without a sync."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class Staging:
    """Uploads into one destination tensor; on the CPU a plain copy."""

    def __init__(self) -> None:
        self._host: Tensor | None = None
        self._done: torch.cuda.Event | None = None
        self._frozen = False

    def upload(self, values: Sequence | Tensor, out: Tensor) -> None:
        """Copy ``values`` (nested lists of numbers, or a CPU tensor) into ``out``, never waiting."""
        source = values if isinstance(values, Tensor) else torch.tensor(values, dtype=out.dtype)
        source = source.reshape(out.shape)
        if out.device.type != "cuda":
            out.copy_(source)
            return
        captured = capturing(out.device)
        host = self._buffer_for(source, out, captured)
        host.copy_(source)
        out.copy_(host, non_blocking=True)
        if captured:
            # Every replay copies from this buffer: it must keep what was recorded.
            self._frozen = True
            return
        self._done = torch.cuda.Event()
        self._done.record(torch.cuda.current_stream(out.device))

    def _buffer_for(self, source: Tensor, out: Tensor, captured: bool) -> Tensor:
        # During a capture the device cannot be asked whether the last copy has finished (an
        # event query there invalidates the capture: seen on an H200), and the buffer is frozen
        # by this copy anyway, so a capture always takes a new one.
        reusable = (
            not captured
            and self._host is not None
            and not self._frozen
            and self._host.shape == source.shape
            and self._host.dtype == out.dtype
            and (self._done is None or self._done.query())
        )
        if not reusable:
            self._host = pinned(source.shape, out.dtype)
            self._done = None
            self._frozen = False
        return self._host

    def new_tensor(self, values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A new tensor on ``device`` holding ``values``, uploaded through this staging buffer."""
        source = torch.tensor(values, dtype=dtype)
        out = torch.empty(source.shape, dtype=dtype, device=device)
        self.upload(source, out)
        return out
