"""The bytes model, the timing statistics and the correctness comparison of fsam-bench."""

import time

import pytest
import torch

from benchmarks.agreement import compare
from benchmarks.bytes_model import bytes_per_element, step_bytes
from benchmarks.measure import Budget, Summary, peak_memory_bytes, time_interleaved
from fsam_fused import testing


def test_bytes_model_matches_design_section_3():
    assert bytes_per_element(torch.float32) == 40
    assert bytes_per_element(torch.bfloat16) == 26
    assert bytes_per_element(torch.float32, adaptive=True) == 44
    assert bytes_per_element(torch.float32, momentum=False) == 28
    assert step_bytes(1000, torch.float16) == 26_000


def test_summary_reports_median_and_quartiles():
    s = Summary.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.p25, s.p75, s.min, s.reps) == (3.0, 2.0, 4.0, 1.0, 5)
    assert s.spread_pct == pytest.approx(200 / 3)


def test_interleaved_timing_sees_which_case_is_slower():
    budget = Budget(warmup=1, min_reps=3, max_reps=3, seconds=0.0)
    calls = []
    out = time_interleaved(
        {"fast": [lambda: calls.append("f")], "slow": [lambda: time.sleep(0.01), lambda: calls.append("s")]},
        torch.device("cpu"),
        budget,
    )
    assert calls == ["f", "s"] * 4  # one warm-up, then strictly alternating
    (fast,), fast_total = out["fast"]
    (sleep, _), slow_total = out["slow"]
    assert fast_total.reps == slow_total.reps == 3
    assert sleep.median >= 10.0 > fast.median
    assert slow_total.median >= sleep.median


def test_cpu_peak_memory_counts_transient_allocations():
    x = torch.randn(1 << 18)

    def step():
        a = x * 2  # 1 MiB
        b = a + 1  # 2 MiB live
        del a, b

    peak = peak_memory_bytes(step, torch.device("cpu"))
    assert 2 * x.nbytes <= peak < 3 * x.nbytes


def test_compare_flags_an_element_outside_tolerance_and_names_it():
    expected = [torch.randn(7), torch.randn(3, 4)]
    close = [t + 1e-7 for t in expected]
    assert compare(close, expected, "p", **testing.step(torch.float32))
    far = [t.clone() for t in expected]
    far[1][2, 1] += 1e-3
    verdict = compare(far, expected, "p", **testing.step(torch.float32))
    assert not verdict and "p[1]" in verdict.detail
    poisoned = [t.clone() for t in expected]
    poisoned[0][3] = float("nan")
    assert not compare(poisoned, expected, "p", **testing.step(torch.float32))
