"""The step table derives speedup and bandwidth from the timings and flags noisy rows."""

import pytest

from benchmarks.measure import Summary
from benchmarks.report import derive, step_table, variant_table
from benchmarks.step_bench import StepResult


def _result(backend, samples, status="ok", variant="fsam", model_bytes=40_000_000):
    r = StepResult(
        "resnet18",
        "cpu",
        "float32",
        backend,
        tensors=62,
        numel=1_000_000,
        variant=variant,
        status=status,
        model_bytes=model_bytes,
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


def test_variants_are_compared_with_fsam_and_with_their_eta_zero_step_of_the_same_backend():
    results = [
        _result("native", [9.0, 10.0, 11.0]),
        _result("torch", [19.0, 20.0, 21.0]),
        _result("native", [10.0, 12.0, 14.0], variant="asam", model_bytes=44_000_000),
        _result("native", [12.0, 13.2, 14.0], variant="asam_eta", model_bytes=44_000_000),
        _result("torch", [18.0, 19.0, 20.0], variant="fisher"),
    ]
    derive(results, copy_bandwidth=20e9)
    asam, asam_eta, fisher = (r.derived for r in results[2:])
    assert asam == pytest.approx({**asam, "time_vs_fsam": 1.2}) and "time_vs_asam" not in asam
    assert asam_eta == pytest.approx({**asam_eta, "time_vs_fsam": 1.32, "time_vs_asam": 1.1})
    assert fisher == pytest.approx({**fisher, "time_vs_fsam": 0.95})
    rows = [line.split() for line in variant_table(results).splitlines()[2:-1]]
    assert [row[2:5] + row[7:] for row in rows] == [
        ["native", "asam", "fsam", "+20.0%", "+10%"],
        ["native", "asam_eta", "asam", "+10.0%", "+0%"],
        ["native", "asam_eta", "fsam", "+32.0%", "+10%"],
        ["torch", "fisher", "fsam", "-5.0%", "+0%"],
    ]


def test_no_variant_table_without_a_variant_beside_its_plain_step():
    results = [_result("native", [9.0, 10.0, 11.0], variant="asam_eta"), _result("native", [9.0, 10.0, 11.0])]
    results[1].total = None  # fsam failed its check: nothing to compare with
    derive(results, copy_bandwidth=20e9)
    assert variant_table(results) is None
