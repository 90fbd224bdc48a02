"""When two computations of the same F-SAM math count as equal: the one tolerance table.

The test suite and the benchmark suite's correctness gate both compare against it, so a
backend that passes one passes the other. Each entry is ``dict(rtol=..., atol=...)`` as
``torch.testing.assert_close`` takes it.

- ``step``: a whole optimizer step (or a few) against another backend or the fp64 oracle.
  fp32: both sides compute in fp32 but sum the norm in a different order. Half types: one
  rounding of ``p + e`` to the parameter's dtype may land one ulp apart, and that carries
  through later steps.
- ``op``: one backend op against the per-tensor op oracle (one rounding apart at most;
  torch.testing's own defaults for the half types).
- ``momentum``: the fp32 momentum after one op.
- ``training``: a short training run (tens of steps), where per-step rounding differences grow.
"""

from __future__ import annotations

import torch

_STEP = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-5, atol=1e-6),  # the kernels compute in fp32 whatever the dtype
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
_OP = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}
MOMENTUM = dict(rtol=1e-6, atol=1e-6)
TRAINING = dict(rtol=1e-4, atol=1e-5)


def step(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance for parameters of ``dtype`` after whole optimizer steps (see the module docstring)."""
    return _STEP[dtype]


def op(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance for one backend op's output of ``dtype`` against the op oracle."""
    return _OP[dtype]
