"""Reading a tensor's row of the plan's coefficient table inside a kernel.

The table is fp32 ``[n, 4]``, contiguous, with the columns of ``fsam_fused.plan``:
``rho, sigma, lmbda, adaptive`` (``lmbda`` already 0 for unseeded momentum).
"""

import triton
import triton.language as tl


@triton.jit
def load_coef(coef, t):
    """``rho, sigma, lmbda`` and ``adaptive`` (a boolean) of tensor ``t``."""
    row = coef + t * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3) != 0
