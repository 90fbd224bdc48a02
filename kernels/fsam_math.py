"""The per-element F-SAM arithmetic of the Triton kernels: the counterpart of csrc/fsam_math.h.

The helpers carry the C++ names and the same fp32 operations in the same order, so a change
to the formula is one edit per kernel family and the two families round alike (the kernels
are compiled with fp fusion off, see common.py). The perturbation is the general form of the
F-SAM paper's appendix A4, ``e = rho * T^2 d / ||T d||`` with ``T^2 = a^2 / f``:
``a = |p| + adaptive_eta`` where adaptive (ASAM) else 1, and ``f = 1 + fisher_eta * g^2``
(Fisher SAM's diagonal, from the raw gradient ``g``, never ``d``) where ``fisher_eta != 0``.
With both etas 0 every result is bit for bit that of plain F-SAM/ASAM: ``|p| * |p| == p * p``,
``|p| + 0 == |p|``, and the Fisher division is not taken.

The coefficient table is fp32 ``[n, COEF_COLUMNS]``, contiguous, with the columns of
``fsam_fused.plan`` (``lmbda`` already 0 for unseeded momentum).
"""

import triton
import triton.language as tl

from .. import plan

COEF_COLUMNS: tl.constexpr = tl.constexpr(plan.COEF_COLUMNS)
_RHO: tl.constexpr = tl.constexpr(plan.RHO)
_SIGMA: tl.constexpr = tl.constexpr(plan.SIGMA)
_LMBDA: tl.constexpr = tl.constexpr(plan.LMBDA)
_ADAPTIVE: tl.constexpr = tl.constexpr(plan.ADAPTIVE)
_ADAPTIVE_ETA: tl.constexpr = tl.constexpr(plan.ADAPTIVE_ETA)
_FISHER_ETA: tl.constexpr = tl.constexpr(plan.FISHER_ETA)


@triton.jit
def read_coef(coef, t):
    """``rho, sigma, lmbda, adaptive`` (a boolean), ``adaptive_eta, fisher_eta`` of tensor ``t``."""
    row = coef + t * COEF_COLUMNS
    return (
        tl.load(row + _RHO),
        tl.load(row + _SIGMA),
        tl.load(row + _LMBDA),
        tl.load(row + _ADAPTIVE) != 0,
        tl.load(row + _ADAPTIVE_ETA),
        tl.load(row + _FISHER_ETA),
    )


@triton.jit
def direction(g, m, sigma):
    """``d = g - sigma * m``, with the momentum from before this step's EMA update."""
    return g - sigma * m


@triton.jit
def ema(m, g, lmbda):
    """The EMA takes the (unscaled) gradient, never ``d``."""
    return m * lmbda + g * (1.0 - lmbda)


@triton.jit
def adaptive_weight(p, adaptive_eta):
    """ASAM's ``a = |p| + adaptive_eta`` (used only where adaptive)."""
    return tl.abs(p) + adaptive_eta


@triton.jit
def fisher_divided(x, g, fisher_eta):
    """``x / (1 + fisher_eta * g^2)`` where ``fisher_eta != 0``, else ``x`` untouched."""
    return tl.where(fisher_eta != 0, tl.div_rn(x, 1.0 + fisher_eta * g * g), x)


@triton.jit
def norm_term(p, g, d, adaptive, adaptive_eta, fisher_eta):
    """``(T d)^2 = (a * d)^2 / f``."""
    ad = tl.where(adaptive, adaptive_weight(p, adaptive_eta) * d, d)
    return fisher_divided(ad * ad, g, fisher_eta)


@triton.jit
def step_scale(total_sq_norm, rho, eps):
    """``rho / (||T d|| + eps)`` from the global squared norm, correctly rounded as in C++."""
    return tl.div_rn(rho, tl.sqrt_rn(total_sq_norm) + eps)


@triton.jit
def perturbed(p, g, d, scale, adaptive, adaptive_eta, fisher_eta):
    """``p + (T^2 d) * scale`` with ``T^2 d = ((a * a) * d) / f``, in the reference loop's order."""
    a = adaptive_weight(p, adaptive_eta)
    weighted = fisher_divided(tl.where(adaptive, (a * a) * d, d), g, fisher_eta)
    return p + weighted * scale
