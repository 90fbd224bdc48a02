"""``perturb_``: one pass per element that saves, updates momentum and perturbs.

Per element of a tensor with coefficients ``rho, sigma, lmbda`` and normalisation ``T``
(``adaptive, adaptive_eta, fisher_eta``; see fsam_math.py): ``backup <- p``;
``g = grad * inv_scale``; ``d = g - sigma * m``; ``m <- lmbda * m + (1 - lmbda) * g``;
``p <- p + (T^2 d) * scale`` with ``scale = rho / (sqrt(total) + eps)`` computed in every
program from the total in device memory. When the total is not finite the stores of ``m``
and ``p`` are masked off, so they stay bit-identical (multiplying by a zero flag would not:
0 * inf is NaN); the backup is written either way so that ``restore_`` stays unconditional.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .block_map import load_entry
from .common import fixed
from .fsam_math import direction, ema, perturbed, read_coef, step_scale
from .plan_arrays import PlanArrays
from .tensor_table import element_ptr, load_addresses
from .vector import aligned_ptr, vectorizable, whole_vectors


@triton.jit
def _perturb_chunk(
    p_ptr,
    g_ptr,
    m_ptr,
    b_ptr,
    count,
    update_limit,
    scale,
    unscale,
    sigma,
    lmbda,
    adaptive,
    adaptive_eta,
    fisher_eta,
    ELEMENT: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    for off in range(0, count, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        inside = idx < count
        update = idx < update_limit
        p_stored = tl.load(p_ptr + idx, mask=inside)
        tl.store(b_ptr + idx, p_stored, mask=inside)
        g = tl.load(g_ptr + idx, mask=update, other=0.0).to(tl.float32)
        if HAS_INV_SCALE:
            g = g * unscale
        d = g
        if HAS_MOMENTUM:
            m = tl.load(m_ptr + idx, mask=update, other=0.0)
            d = direction(g, m, sigma)
            tl.store(m_ptr + idx, ema(m, g, lmbda), mask=update)
        p = perturbed(p_stored.to(tl.float32), g, d, scale, adaptive, adaptive_eta, fisher_eta)
        tl.store(p_ptr + idx, p.to(ELEMENT), mask=update)


@triton.jit
def _perturb_kernel(
    table,
    n,
    block_map,
    coef,
    inv_scale,
    total_sq_norm,
    eps,
    ELEMENT: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t, start, count = load_entry(block_map, c)
    rho, sigma, lmbda, adaptive, adaptive_eta, fisher_eta = read_coef(coef, t)
    total = tl.load(total_sq_norm)
    ok = tl.abs(total) < float("inf")  # False for NaN too
    # Stores of m and p reach elements below this bound only (see sq_norm.py on why a bound).
    update_limit = tl.where(ok, count, 0)
    scale = step_scale(total, rho, eps)
    unscale = tl.load(inv_scale) if HAS_INV_SCALE else 1.0
    p, g, m, b = load_addresses(table, n, t)
    if vectorizable(p | g | m | b, start, count):
        _perturb_chunk(
            aligned_ptr(p, start, ELEMENT), aligned_ptr(g, start, ELEMENT),
            aligned_ptr(m, start, tl.float32), aligned_ptr(b, start, ELEMENT),
            whole_vectors(count), whole_vectors(update_limit), scale, unscale,
            sigma, lmbda, adaptive, adaptive_eta, fisher_eta, ELEMENT, HAS_MOMENTUM, HAS_INV_SCALE, BLOCK,
        )  # fmt: skip
    else:
        _perturb_chunk(
            element_ptr(p, start, ELEMENT), element_ptr(g, start, ELEMENT),
            element_ptr(m, start, tl.float32), element_ptr(b, start, ELEMENT),
            count, update_limit, scale, unscale,
            sigma, lmbda, adaptive, adaptive_eta, fisher_eta, ELEMENT, HAS_MOMENTUM, HAS_INV_SCALE, BLOCK,
        )  # fmt: skip


_launch = fixed(_perturb_kernel)


def perturb_(
    arrays: PlanArrays, coef: Tensor, inv_scale: Tensor | None, total_sq_norm: Tensor, eps: float
) -> None:
    """Apply the perturbation to the plan described by ``arrays`` (see the module docstring)."""
    for segment in arrays.segments:
        _launch(
            (segment.chunks,),
            arrays.table,
            arrays.n,
            segment.block_map,
            coef,
            inv_scale if inv_scale is not None else coef,
            total_sq_norm,
            eps,
            ELEMENT=segment.element,
            HAS_MOMENTUM=arrays.has_momentum,
            HAS_INV_SCALE=inv_scale is not None,
        )
