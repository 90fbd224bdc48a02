"""Copying small host tables (indices, addresses, hyperparameters) to a device without a sync.

A CUDA copy from pageable host memory makes the host wait for the device; one from pinned
memory with ``non_blocking=True`` does not. Every table the optimizer and its backends put on
a device goes through :class:`Staging`, which holds its pinned buffers itself: inside graph
capture, where the caching host allocator's behaviour differs between torch releases, nothing
here depends on it.

- an eager upload rewrites its buffer only after the device has finished reading it (an event
  recorded after each copy says when); while the device still reads it, the upload takes a new
  one (the allocator keeps a block a pending copy reads, as it does for any ``non_blocking``
  copy from pinned memory);
- a copy recorded into a CUDA graph reads, at every replay, the buffer it was recorded with:
  that buffer is never rewritten and is held as long as the Staging lives;
- inside a capture nothing is asked of the device (an event query there invalidates the
  capture: seen on an H200) and, after an eager upload of the same shape or a
  :meth:`Staging.reserve`, nothing is allocated for the capture's first upload: it records from
  a spare buffer set aside then, which no copy has read. (A second upload through the same
  Staging within one capture, or a capture right after another, allocates.)
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


def copy_finished_event(device: torch.device) -> torch.cuda.Event:
    """An event recorded on ``device``'s current stream, after the copies queued so far."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _fits(buffer: Tensor | None, shape: torch.Size, dtype: torch.dtype) -> bool:
    return buffer is not None and buffer.shape == shape and buffer.dtype == dtype


class Staging:
    """Uploads into one destination tensor; on the CPU a plain copy."""

    def __init__(self) -> None:
        self._host: Tensor | None = None  # what eager uploads copy from
        self._done: torch.cuda.Event | None = None  # recorded after the last eager copy
        self._spare: Tensor | None = None  # read by no copy yet: what a capture records from
        self._recorded: list[Tensor] = []  # read by captured graphs at every replay

    def upload(self, values: Sequence | Tensor, out: Tensor) -> None:
        """Copy ``values`` (nested lists of numbers, or a CPU tensor) into ``out``, never waiting."""
        source = values if isinstance(values, Tensor) else torch.tensor(values, dtype=out.dtype)
        source = source.reshape(out.shape)
        if out.device.type != "cuda":
            out.copy_(source)
            return
        if capturing(out.device):
            host = self._take_spare(source.shape, out.dtype)
            self._recorded.append(host)
            host.copy_(source)
            out.copy_(host, non_blocking=True)
            return
        host = self._reusable(source.shape, out.dtype)
        if host is None:
            host = self._host = pinned(source.shape, out.dtype)
        host.copy_(source)
        out.copy_(host, non_blocking=True)
        self._done = copy_finished_event(out.device)
        if not _fits(self._spare, source.shape, out.dtype):
            self._spare = pinned(source.shape, out.dtype)

    def reserve(self, out: Tensor) -> None:
        """Set aside now the buffer a capture would record an upload into ``out`` from, for a
        table that was written some other way and may see its first upload inside a capture."""
        if out.device.type != "cuda" or capturing(out.device) or _fits(self._spare, out.shape, out.dtype):
            return
        self._spare = pinned(out.shape, out.dtype)

    def _reusable(self, shape: torch.Size, dtype: torch.dtype) -> Tensor | None:
        """The eager buffer, if it fits and the device has finished reading it."""
        if _fits(self._host, shape, dtype) and (self._done is None or self._done.query()):
            return self._host
        return None

    def _take_spare(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        spare, self._spare = self._spare, None
        if _fits(spare, shape, dtype):
            return spare
        # No eager upload of this shape came first: allocated during the capture, which torch's
        # caching host allocator then has to support.
        return pinned(shape, dtype)

    def new_tensor(self, values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A new tensor on ``device`` holding ``values``, uploaded through this staging buffer."""
        source = torch.tensor(values, dtype=dtype)
        out = torch.empty(source.shape, dtype=dtype, device=device)
        self.upload(source, out)
        return out
