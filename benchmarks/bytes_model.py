"""The memory-traffic model of one SAM step (DESIGN.md section 3).

Per element: ``sq_norm`` reads g and m (and p when adaptive); ``perturb_`` reads g, m,
p and writes m, backup, p; ``restore_`` reads backup and writes p. Momentum is fp32
whatever the parameter dtype; gradients and backups have the parameter's dtype. SAM
keeps no momentum. fp32 F-SAM comes to 40 B per element, bf16 to 26 B.
"""

from __future__ import annotations

import torch

MOMENTUM_BYTES = 4  # fp32


def bytes_per_element(dtype: torch.dtype, *, momentum: bool = True, adaptive: bool = False) -> int:
    """Bytes read plus written per parameter element by first_step + second_step."""
    p = torch.empty((), dtype=dtype).element_size()
    m = MOMENTUM_BYTES if momentum else 0
    sq_norm = p + m + (p if adaptive else 0)
    perturb = (p + m + p) + (m + p + p)
    restore = p + p
    return sq_norm + perturb + restore


def step_bytes(numel: int, dtype: torch.dtype, *, momentum: bool = True, adaptive: bool = False) -> int:
    """Bytes the whole step moves for ``numel`` parameter elements: the floor's numerator."""
    return numel * bytes_per_element(dtype, momentum=momentum, adaptive=adaptive)
