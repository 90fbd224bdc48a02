"""What every kernel wrapper shares: element types, the interpreter switch, launch configs.

Under ``TRITON_INTERPRET=1`` Triton runs kernels on the CPU in Python (how CI tests
them). Whether it does is fixed when ``@triton.jit`` decorates a kernel, that is when
this package is imported, so the switch is read once here and the backend advertises
the matching device type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

ELEMENT_TYPES: dict[torch.dtype, tl.dtype] = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


@dataclass(frozen=True)
class LaunchConfig:
    """Elements per loop iteration of one program, and its warps."""

    block: int
    num_warps: int


# Streaming kernels saturate memory bandwidth over a wide range of block sizes; these
# are the candidates for autotuning, and the first is the fixed choice where a kernel
# cannot be autotuned. The interpreter runs each program in Python, where a few
# iterations of a mid-sized block keep the loops exercised without dragging.
GPU_CONFIGS = (LaunchConfig(2048, 8), LaunchConfig(1024, 4), LaunchConfig(4096, 8))
FIXED_CONFIG = LaunchConfig(4096, 1) if INTERPRETED else GPU_CONFIGS[0]


Launcher = Callable[..., None]


def autotuned(kernel: triton.JITFunction, key: list[str]) -> Launcher:
    """``launch(grid, *args, **constexprs)`` for a kernel whose reruns are harmless.

    On the GPU the block size and warps are tuned once per ``key`` (the first launch
    times every candidate, which synchronises); the interpreter takes the fixed config.
    The autotuner is built on the first GPU launch, so importing the kernels does no work
    that may need a GPU driver.
    """
    tuned: list = []

    def launch(grid: tuple[int, ...], *args: object, **constexprs: object) -> None:
        if INTERPRETED:
            fixed(kernel)(grid, *args, **constexprs)
            return
        if not tuned:
            configs = [triton.Config({"BLOCK": c.block}, num_warps=c.num_warps) for c in GPU_CONFIGS]
            tuned.append(triton.autotune(configs=configs, key=key)(kernel))
        tuned[0][grid](*args, **constexprs)

    return launch


def fixed(kernel: triton.JITFunction) -> Launcher:
    """``launch(grid, *args, **constexprs)`` with the one config of :data:`FIXED_CONFIG`."""

    def launch(grid: tuple[int, ...], *args: object, **constexprs: object) -> None:
        kernel[grid](*args, **constexprs, BLOCK=FIXED_CONFIG.block, num_warps=FIXED_CONFIG.num_warps)

    return launch
