"""Stands in for the GPU machine's ``python3`` in tests/test_gpu_check_script.py.

Run as ``fake NAME ARGS...`` (NAME: the command it stands in for). It appends the call to
the JSON lines file ``$FAKE_CALLS`` (name, stage, arguments, the environment the script
promises), then plays the stage's part as ``$FAKE_PLAN`` says: what the detection prints,
each stage's exit status, a sleep, and the files the tests and the benchmark write.
"""

import json
import os
import sys
import time
from pathlib import Path

WATCHED_ENV = (
    "FSAM_FUSED_CUDA",
    "TORCH_CUDA_ARCH_LIST",
    "TRITON_CACHE_DIR",
    "PYTHONPATH",
    "PYTHONFAULTHANDLER",
)


def stage_of(args: list[str], program: str) -> str:
    if "get_device_capability" in program:
        return "detect"
    if "has_cuda_kernels" in program:
        return "imports"
    if args[:1] == ["setup.py"]:
        return "setup"
    if args[:2] in (["-m", "pip"], ["-m", "pytest"], ["-m", "benchmarks"]):
        return args[1]
    return "unexpected"


def option(args: list[str], flag: str) -> str:
    """The value of ``flag=V`` or ``flag V`` in ``args``."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag:
            return args[i + 1]
    raise ValueError(f"{flag} not in {args}")


def play(stage: str, args: list[str], plan: dict) -> None:
    if stage == "detect":
        print("\n".join(f"{key}={value}" for key, value in plan["detected"].items()))
        print(plan["detection_stderr"], file=sys.stderr)
    elif stage == "pytest":
        Path(option(args, "--junitxml")).write_text("<testsuites/>")
        print("x" * plan.get("pytest_output_bytes", 0))
        print("tests/test_a.py::test_one PASSED")
        if plan.get("pytest_crashes"):
            print("tests/test_a.py::test_two Fatal Python error: Segmentation fault")
            print("Extension modules: numpy._core._multiarray_umath, torch._C (total: 2)")
            return
        if plan.get("pytest"):
            print("FAILED tests/test_a.py::test_two - AssertionError: a disagreement")
        print("=== 1 passed in 0.01s ===")
    elif stage == "benchmarks" and plan.get("bench_writes", True):
        json_path = Path(option(args, "--json"))
        json_path.write_text("{}")
        Path(option(args, "--png")).write_bytes(b"png")
        for i in range(plan.get("bench_extra_files", 0)):
            json_path.with_name(f"extra{i}.txt").write_text("x")
        print("the step table")


def main() -> int:
    name, args = sys.argv[1], sys.argv[2:]
    plan = json.loads(os.environ["FAKE_PLAN"])
    stage = stage_of(args, sys.stdin.read() if args[:1] == ["-"] else "")
    call = {"name": name, "stage": stage, "args": args, "env": {k: os.environ.get(k) for k in WATCHED_ENV}}
    with open(os.environ["FAKE_CALLS"], "a") as calls:
        calls.write(json.dumps(call) + "\n")
    play(stage, args, plan)
    sys.stdout.flush()
    time.sleep(plan.get("sleep", {}).get(stage, 0))
    return 97 if stage == "unexpected" else plan.get(stage, 0)


if __name__ == "__main__":
    sys.exit(main())
