"""pytest-benchmark entry points for the optimizer step: ``pytest benchmarks/``.

Not part of the default test run (its testpaths is tests/). Compare runs with
pytest-benchmark's tooling, e.g. ``pytest benchmarks/ --benchmark-autosave`` and then
``pytest-benchmark compare``. On the CPU only the presets that time in seconds run.
"""

import pytest
import torch

from fsam_fused import FriendlySAM

from .cli import runnable_backends
from .measure import synchronize
from .presets import PRESETS, parameter_shapes
from .step_bench import FSAM_KWARGS, NoBaseStep, make_params

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_PRESETS = ("resnet18", "tiny")
BENCH_PRESETS = list(PRESETS) if DEVICE.type == "cuda" else list(CPU_PRESETS)


@pytest.mark.parametrize("backend", ["reference", *runnable_backends(DEVICE)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("preset", BENCH_PRESETS)
def test_first_plus_second_step(benchmark, preset, dtype, backend):
    params = make_params(parameter_shapes(preset), DEVICE, dtype, seed=0)
    opt = FriendlySAM(params, NoBaseStep, backend=backend, **FSAM_KWARGS)

    def step():
        opt.first_step()
        opt.second_step()
        synchronize(DEVICE)

    benchmark.group = f"{preset} {str(dtype).removeprefix('torch.')}"  # backends side by side
    benchmark.extra_info.update(preset=preset, dtype=str(dtype), backend=backend, device=str(DEVICE))
    benchmark.pedantic(step, warmup_rounds=2, rounds=10 if DEVICE.type == "cpu" else 100)
