"""``fsam-bench --profile``: where a step's host time goes, per backend, by torch.profiler.

On a GPU, the step over a model of many small tensors is bound by its host work and its
launches, not by memory (README's GPU table: native ResNet-18, 0.48 ms for 0.11 ms of bytes).
This table names the calls that take that time: PROFILED_STEPS steps (``first_step`` +
``second_step``, no-op base optimizer) after warm-up, on one preset and dtype.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from fsam_fused import FriendlySAM

from .measure import quiet_native_stderr, synchronize
from .presets import parameter_shapes
from .step_bench import FSAM_KWARGS, NoBaseStep, make_params

PROFILED_STEPS = 10
WARMUP_STEPS = 3
ROWS = 15


def profile_tables(preset: str, backends: list[str], device: torch.device, dtype: torch.dtype) -> str:
    """One profiler table per backend, its rows sorted by the host time spent in each call itself."""
    params = make_params(parameter_shapes(preset), device, dtype, seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = []
    for backend in backends:
        opt = FriendlySAM(params, NoBaseStep, backend=backend, **FSAM_KWARGS)
        for _ in range(WARMUP_STEPS):
            opt.first_step()
            opt.second_step()
        synchronize(device)
        with quiet_native_stderr(), profile(activities=activities) as prof:
            for _ in range(PROFILED_STEPS):
                opt.first_step()
                opt.second_step()
            synchronize(device)
        dtype_name = str(dtype).removeprefix("torch.")
        heading = f"{preset} {dtype_name} {backend}: host time by call over {PROFILED_STEPS} steps"
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ROWS)
        tables.append(f"{heading}\n{table}")
    return "\n\n".join(tables)
