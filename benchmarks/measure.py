"""Timing, copy bandwidth and peak memory, done the same way for every backend.

Timing: warm-up calls first, then repetitions until both a minimum count and a time
budget are reached (bounded by a maximum count). On CUDA each phase is bracketed by CUDA
events that are read after one synchronisation at the end, so the host never waits
between phases; on the CPU the kernels run synchronously and ``perf_counter`` brackets
them. Competing cases are interleaved repetition by repetition.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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

    def scaled(self, factor: float) -> Summary:
        """The same statistics of the timings multiplied by ``factor`` (e.g. per iteration)."""
        return Summary(
            self.median * factor, self.p25 * factor, self.p75 * factor, self.min * factor, self.reps
        )

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


Phases = Sequence[Callable[[], None]]


def time_interleaved(
    cases: Mapping[str, Phases], device: torch.device, budget: Budget
) -> dict[str, tuple[list[Summary], Summary]]:
    """Time several cases, one repetition of each in turn, so that load from other
    processes on a shared machine falls on all of them alike.

    Each case is a sequence of phases run in order; returns per case a :class:`Summary`
    per phase and one of the per-repetition sums.
    """
    for _ in range(budget.warmup):
        for phases in cases.values():
            for phase in phases:
                phase()
    synchronize(device)
    sample = _cuda_sampler(device) if device.type == "cuda" else _host_sample
    pending: dict[str, list[Callable[[], list[float]]]] = {name: [] for name in cases}
    start = time.perf_counter()
    for rep in range(budget.max_reps):
        for name, phases in cases.items():
            pending[name].append(sample(phases))
        if rep + 1 >= budget.min_reps and time.perf_counter() - start > budget.seconds:
            synchronize(device)  # on CUDA the host runs ahead: count the queued work too
            if time.perf_counter() - start > budget.seconds:
                break
    synchronize(device)
    out = {}
    for name, reads in pending.items():
        reps = [read() for read in reads]
        per_phase = [Summary.of(list(column)) for column in zip(*reps, strict=True)]
        out[name] = (per_phase, Summary.of([sum(r) for r in reps]))
    return out


def _host_sample(phases: Phases) -> Callable[[], list[float]]:
    times = []
    for phase in phases:
        t0 = time.perf_counter()
        phase()
        times.append(1e3 * (time.perf_counter() - t0))
    return lambda: times


def _cuda_sampler(device: torch.device) -> Callable[[Phases], Callable[[], list[float]]]:
    def sample(phases: Phases) -> Callable[[], list[float]]:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
        events[0].record()
        for phase, end in zip(phases, events[1:], strict=True):
            phase()
            end.record()
        return lambda: [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]

    return sample


def copy_bandwidth(device: torch.device, numel: int, budget: Budget) -> float:
    """Copy bandwidth in bytes per second (bytes read plus written) on ``numel`` fp32 elements."""
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    _, summary = time_interleaved({"copy": [lambda: dst.copy_(src)]}, device, budget)["copy"]
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
