"""``fsam-bench --profile``: where a step's host time goes, per backend, by torch.profiler.

On a GPU, the step over a model of many small tensors is bound by its host work and its
launches, not by memory (README's GPU table: native ResNet-18, 0.48 ms for 0.11 ms of bytes).
This table names the calls that take that time: PROFILED_STEPS steps (``first_step`` +
``second_step``, no-op base optimizer) after warm-up, on one preset and dtype.
"""

from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile

from fsam_fused import FriendlySAM

from .measure import synchronize
from .presets import parameter_shapes
from .step_bench import FSAM_KWARGS, NoBaseStep, make_params, run_steps

PROFILED_STEPS = 10
WARMUP_STEPS = 3
ROWS = 15


def profile_tables(preset: str, backends: list[str], device: torch.device, dtype: torch.dtype) -> str:
    """One profiler table per backend, its rows sorted by the host time spent in each call itself
    (a backend that fails says so in place of its table)."""
    params = make_params(parameter_shapes(preset), device, dtype, seed=0)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        # One CUPTI session per backend, in a process that captured CUDA graphs: keep CUPTI up
        # between them (torch's own guard against restarting it does this only for Inductor).
        os.environ.setdefault("TEARDOWN_CUPTI", "0")
    dtype_name = str(dtype).removeprefix("torch.")
    tables = []
    for backend in backends:
        heading = f"{preset} {dtype_name} {backend}: host time by call over {PROFILED_STEPS} steps"
        try:
            tables.append(f"{heading}\n{_profile(backend, params, device, activities)}")
        except Exception as exc:
            tables.append(f"{heading}: failed: {type(exc).__name__}: {exc}")
    return "\n\n".join(tables)


def _profile(backend: str, params: list[torch.Tensor], device: torch.device, activities: list) -> str:
    opt = FriendlySAM(params, NoBaseStep, backend=backend, **FSAM_KWARGS)
    run_steps(opt, WARMUP_STEPS)
    synchronize(device)
    with profile(activities=activities) as prof:
        run_steps(opt, PROFILED_STEPS)
        synchronize(device)  # the device's work inside the window (its wait shows as a row)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ROWS)
