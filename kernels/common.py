"""What every kernel wrapper shares: element types, the interpreter switch, how kernels launch.

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


# One launch configuration per kernel, never autotuned: a tuner synchronises and allocates
# scratch memory on first use (fatal inside a CUDA-graph capture or under
# torch.cuda.set_sync_debug_mode("error")), and the block size fixes the order in which a
# norm is summed, which a tuner would pick afresh in every process. Streaming kernels
# saturate memory bandwidth over a wide range of block sizes. The interpreter runs each
# program in Python, where a few iterations of a mid-sized block keep the loops exercised
# without dragging.
FIXED_CONFIG = LaunchConfig(4096, 1) if INTERPRETED else LaunchConfig(2048, 8)

# Options of every compiled kernel. No fp fusion: the compiler would contract a * b + c
# into one FMA with one rounding, while the native build (-ffp-contract=off, --fmad=false)
# and the interpreter round twice; without it the backends agree bit for bit.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


Launcher = Callable[..., None]


def fixed(kernel: triton.JITFunction, config: LaunchConfig = FIXED_CONFIG) -> Launcher:
    """``launch(grid, *args, **constexprs)`` with the one ``config`` and :data:`COMPILE_OPTIONS`."""

    def launch(grid: tuple[int, ...], *args: object, **constexprs: object) -> None:
        kernel[grid](*args, **constexprs, BLOCK=config.block, num_warps=config.num_warps, **COMPILE_OPTIONS)

    return launch
