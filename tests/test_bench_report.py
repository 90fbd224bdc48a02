"""The step table derives speedup and bandwidth from the timings and flags noisy rows."""

import pytest

from benchmarks.measure import Summary
from benchmarks.report import derive, step_table
from benchmarks.step_bench import StepResult


def _result(backend, samples, status="ok"):
    r = StepResult(
        "resnet18",
        "cpu",
        "float32",
        backend,
        tensors=62,
        numel=1_000_000,
        status=status,
        model_bytes=40_000_000,
    )
    if status == "ok":
        r.first = r.second = r.total = Summary.of(samples)
    return r


def test_speedup_and_bandwidth_fraction_come_from_medians():
    results = [_result("reference", [8.0, 9.0, 10.0]), _result("torch", [4.0, 4.5, 5.0])]
    derive(results, copy_bandwidth=20e9)
    torch_row = results[1].derived
    assert torch_row["speedup"] == 2.0
    assert torch_row["bandwidth_fraction"] == pytest.approx(40e6 / 4.5e-3 / 20e9)
    assert torch_row["floor_ms"] == pytest.approx(2.0)


def test_table_lists_failures_and_warns_about_noisy_rows():
    quiet = [_result("reference", [10.0, 10.1, 10.2]), _result("native", [], status="FAILED: p[3] differs")]
    derive(quiet, copy_bandwidth=20e9)
    table = step_table(quiet, 20e9)
    assert "native: FAILED: p[3] differs" in table and "WARNING" not in table
    noisy = [_result("reference", [10.0, 30.0, 50.0])]
    derive(noisy, copy_bandwidth=20e9)
    assert "WARNING: 1 row(s)" in step_table(noisy, 20e9)
