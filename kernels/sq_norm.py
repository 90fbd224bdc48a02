"""``sq_norm``: the fp32 sum over a plan of ``||T d||^2``, reduced on the device.

Two stages, as in apex's ``multi_tensor_l2norm``: every chunk of the block map writes
its partial sum to its own slot, then one program adds the slots up in a fixed order.
No atomics, so the result is the same bit for bit on every run.

Per element: ``g = grad * inv_scale``, ``d = g - sigma * m`` and the term ``(T d)^2`` of
``fsam_math.norm_term``. ``m`` is read only where ``sigma != 0`` and ``p`` only where
adaptive: masked-off loads cost no memory traffic. (The masks are bounds, ``idx < limit``,
rather than ``inside & flag``: the interpreter of Triton 3.8 cannot ``&`` a block mask
with a scalar flag.)
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .block_map import load_entry
from .common import LaunchConfig, fixed
from .fsam_math import direction, norm_term, read_coef
from .plan_arrays import PlanArrays
from .tensor_table import element_ptr, load_addresses
from .vector import aligned_ptr, vectorizable, whole_vectors


@triton.jit
def _partial_sum(
    p_ptr,
    g_ptr,
    m_ptr,
    count,
    m_limit,
    p_limit,
    unscale,
    sigma,
    adaptive,
    adaptive_eta,
    fisher_eta,
    HAS_MOMENTUM: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, count, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + idx, mask=idx < count, other=0.0).to(tl.float32)
        if HAS_INV_SCALE:
            g = g * unscale
        d = g
        if HAS_MOMENTUM:
            d = direction(g, tl.load(m_ptr + idx, mask=idx < m_limit, other=0.0), sigma)
        p = tl.load(p_ptr + idx, mask=idx < p_limit, other=0.0).to(tl.float32)
        acc += norm_term(p, g, d, adaptive, adaptive_eta, fisher_eta)
    return tl.sum(acc, axis=0)


@triton.jit
def _partials_kernel(
    table,
    n,
    block_map,
    coef,
    inv_scale,
    partials,
    ELEMENT: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t, start, count = load_entry(block_map, c)
    _, sigma, _, adaptive, adaptive_eta, fisher_eta = read_coef(coef, t)
    unscale = tl.load(inv_scale) if HAS_INV_SCALE else 1.0
    p, g, m, _ = load_addresses(table, n, t)
    m_limit = tl.where(sigma != 0, count, 0)
    p_limit = tl.where(adaptive, count, 0)
    if vectorizable(p | g | m, start, count):
        partial = _partial_sum(
            aligned_ptr(p, start, ELEMENT), aligned_ptr(g, start, ELEMENT), aligned_ptr(m, start, tl.float32),
            whole_vectors(count), whole_vectors(m_limit), whole_vectors(p_limit), unscale,
            sigma, adaptive, adaptive_eta, fisher_eta, HAS_MOMENTUM, HAS_INV_SCALE, BLOCK,
        )  # fmt: skip
    else:
        partial = _partial_sum(
            element_ptr(p, start, ELEMENT), element_ptr(g, start, ELEMENT), element_ptr(m, start, tl.float32),
            count, m_limit, p_limit, unscale,
            sigma, adaptive, adaptive_eta, fisher_eta, HAS_MOMENTUM, HAS_INV_SCALE, BLOCK,
        )  # fmt: skip
    tl.store(partials + c, partial)


@triton.jit
def _sum_kernel(values, count, out, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, count, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(values + idx, mask=idx < count, other=0.0)
    tl.store(out, tl.sum(acc, axis=0))


_launch_partials = fixed(_partials_kernel)
_launch_sum = fixed(_sum_kernel, LaunchConfig(1024, 4))


def sq_norm(arrays: PlanArrays, coef: Tensor, inv_scale: Tensor | None, out: Tensor) -> None:
    """Write ``sum ||T d||^2`` over the plan described by ``arrays`` into the 0-dim ``out``."""
    for segment in arrays.segments:
        _launch_partials(
            (segment.chunks,),
            arrays.table,
            arrays.n,
            segment.block_map,
            coef,
            inv_scale if inv_scale is not None else coef,
            arrays.partials[segment.partials],
            ELEMENT=segment.element,
            HAS_MOMENTUM=arrays.has_momentum,
            HAS_INV_SCALE=inv_scale is not None,
        )
    _launch_sum((1,), arrays.partials, arrays.partials.numel(), out)
