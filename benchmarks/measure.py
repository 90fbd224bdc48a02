"""Timing, copy bandwidth and peak memory, done the same way for every backend.

Timing: warm-up calls first, then repetitions until both a minimum count and a time
budget are reached (bounded by a maximum count). On CUDA each phase is bracketed by CUDA
events and read after one synchronisation at the end, so the host never waits between
phases; on the CPU the kernels run synchronously and ``perf_counter`` brackets them.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Summary:
    """Robust statistics of repeated timings, in milliseconds."""

    median: float
    p25: float
    p75: float
    min: float
    reps: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Summary:
        assert samples_ms, "no timing samples"
        ordered = sorted(samples_ms)
        q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
        return cls(median=statistics.median(ordered), p25=q[0], p75=q[2], min=ordered[0], reps=len(ordered))

    @property
    def spread_pct(self) -> float:
        """Interquartile range as a percentage of the median."""
        return 100.0 * (self.p75 - self.p25) / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "spread_pct": self.spread_pct}


@dataclass(frozen=True)
class Budget:
    """How long to time one case: warm-up calls, then ``min_reps`` to ``max_reps`` repetitions,
    stopping once ``seconds`` have been spent (after ``min_reps``)."""

    warmup: int = 3
    min_reps: int = 10
    max_reps: int = 200
    seconds: float = 2.0


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phases(
    phases: Sequence[Callable[[], None]], device: torch.device, budget: Budget
) -> tuple[list[Summary], Summary]:
    """Run ``phases`` in order repeatedly; return a :class:`Summary` per phase and one of
    their per-repetition sums."""
    for _ in range(budget.warmup):
        for phase in phases:
            phase()
    synchronize(device)
    if device.type == "cuda":
        samples = _time_cuda(phases, device, budget)
    else:
        samples = _time_host(phases, budget)
    totals = [sum(rep) for rep in zip(*samples)]
    return [Summary.of(s) for s in samples], Summary.of(totals)


def _time_host(phases: Sequence[Callable[[], None]], budget: Budget) -> list[list[float]]:
    samples: list[list[float]] = [[] for _ in phases]
    start = time.perf_counter()
    for rep in range(budget.max_reps):
        for i, phase in enumerate(phases):
            t0 = time.perf_counter()
            phase()
            samples[i].append(1e3 * (time.perf_counter() - t0))
        if rep + 1 >= budget.min_reps and time.perf_counter() - start > budget.seconds:
            break
    return samples


def _time_cuda(phases: Sequence[Callable[[], None]], device: torch.device, budget: Budget) -> list[list[float]]:
    marks: list[list[torch.cuda.Event]] = []
    start = time.perf_counter()
    for rep in range(budget.max_reps):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
        events[0].record()
        for phase, end in zip(phases, events[1:]):
            phase()
            end.record()
        marks.append(events)
        if rep + 1 >= budget.min_reps and time.perf_counter() - start > budget.seconds:
            synchronize(device)  # the host ran ahead: include the queued work in the budget
            if time.perf_counter() - start > budget.seconds:
                break
    synchronize(device)
    return [[ev[i].elapsed_time(ev[i + 1]) for ev in marks] for i in range(len(phases))]


def copy_bandwidth(device: torch.device, numel: int, budget: Budget) -> float:
    """Copy bandwidth in bytes per second (bytes read plus written) on ``numel`` fp32 elements."""
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    _, summary = time_phases([lambda: dst.copy_(src)], device, budget)
    return 2 * src.nbytes / (summary.median * 1e-3)


def peak_memory_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory allocated by ``step`` above what was allocated before it.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: the running sum of the
    CPU allocator's allocation and free events recorded by the profiler. None where
    neither applies.
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu":
        return _cpu_peak_bytes(step)
    return None


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop chatter (and its CUDA probe on GPU-less hosts),
    which would otherwise interleave with the benchmark's table."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
