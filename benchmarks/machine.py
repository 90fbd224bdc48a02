"""What the numbers were measured on: CPU, GPU, driver, library versions, commit."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def _run(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _gpu() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_driver": None, "cuda_runtime": torch.version.cuda}
    index = torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return {
        "gpu": torch.cuda.get_device_name(index),
        "gpu_capability": f"{capability[0]}.{capability[1]}",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
        "gpu_driver": driver.splitlines()[0] if driver else None,
        "cuda_runtime": torch.version.cuda,
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def describe() -> dict[str, Any]:
    """The machine, the software and the commit, for the JSON results."""
    commit = _run("git", "rev-parse", "HEAD")
    # Result files are what a run writes; changes to them do not make the code dirty.
    dirty = _run("git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        **_gpu(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": commit,
        "commit_dirty": bool(dirty) if commit else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def slug(machine: dict[str, Any], device: str) -> str:
    """A file-name stem naming the machine and date, e.g. ``cpu-amd-epyc-2c_2026-11-27``."""
    name = machine["gpu"] if device.startswith("cuda") and machine["gpu"] else f"cpu-{machine['cpu']}"
    if not device.startswith("cuda"):
        name += f"-{machine['cpu_cores']}c"
    stem = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{stem}_{machine['date'][:10]}"
