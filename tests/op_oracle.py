"""A plain per-tensor oracle for the three backend ops, shared by every kernel's tests.

The lists hold views at odd offsets into larger buffers for half the tensors and
16-byte aligned tensors for the other half, so both the vector and the scalar paths of
a kernel run; shapes cross the vector widths and the chunk sizes of the CUDA (32768)
and Triton (16384) kernels. Every tensor has its own coefficient row: rho, sigma, lmbda
(0 for some: unseeded), adaptive or not, and the normalisation etas (0 for some, and an
adaptive_eta also where not adaptive, which the kernels must ignore), so adaptive,
Fisher and plain tensors mix in one list. Outputs are poisoned before each op and every
check draws fresh random inputs. :func:`check_ops_match_oracle` runs one round of the
three ops of an :class:`Ops` against the oracle; a mismatch reports the inputs at the
first differing element (tests/mismatch_report.py). :func:`check_zero_etas_are_bit_exact`
holds the ops with both etas 0 to the formula from before the etas, bit for bit.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fsam_fused import testing
from fsam_fused.plan import ADAPTIVE, ADAPTIVE_ETA, COEF_COLUMNS, FISHER_ETA, LMBDA, RHO, SIGMA
from tests.mismatch_report import describe, layout, mismatches, value

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA_CHUNK = 32768
SHAPE_SETS = {
    "vector_widths": [(n,) for n in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33)],
    # Whole 8-element units throughout: with three dtypes, each dtype gets aligned tensors
    # (even positions) that take the vector paths from start to end.
    "whole_vectors": [(8,), (24,), (64,), (4096,), (16384 + 8,), (40,)],
    "chunk_boundaries": [
        (CUDA_CHUNK - 1,),
        (CUDA_CHUNK,),
        (CUDA_CHUNK + 1,),
        (2 * CUDA_CHUNK + 5,),
        (65537,),
    ],
    "zero_dim_and_empty": [(), (0,), (3, 0), (), (6,)],
    "hundreds_of_tiny": [(1 + (7 * i) % 5,) for i in range(300)],
    "channels_last": [(4, 3, 5, 5), (2, 7, 3, 3), (9,)],
}
# More tensors than one CUDA launch holds, so the launch batching is exercised.
SHAPE_SETS["over_one_launch"] = [(3 + i % 11,) for i in range(150)] + [(CUDA_CHUNK * 3 + 1,)]
# For check_zero_etas_are_bit_exact: both kernel paths, channels_last, and a chunk boundary
# in each dtype (the list cycles through the dtypes).
ZERO_ETA_SHAPES = SHAPE_SETS["vector_widths"] + SHAPE_SETS["channels_last"] + [(CUDA_CHUNK + 5,)] * 3 + [()]


COEF_NAMES = {RHO: "rho", SIGMA: "sigma", LMBDA: "lmbda", ADAPTIVE: "adaptive"}
COEF_NAMES.update({ADAPTIVE_ETA: "adaptive_eta", FISHER_ETA: "fisher_eta"})


@dataclass
class Lists:
    params: list[Tensor]
    grads: list[Tensor]
    momentum: list[Tensor]
    backup: list[Tensor]
    coef: Tensor
    inv_scale: Tensor | None
    # What redraws these lists (check_shapes' seed key), for failure reports.
    label: str = ""


def view_at_offset(src: Tensor, offset: int) -> Tensor:
    """A copy of ``src`` (same strides) living at element ``offset`` of a larger buffer."""
    span = src.untyped_storage().nbytes() // src.element_size() if src.numel() else 0
    buffer = torch.full((span + offset + 3,), math.nan, dtype=src.dtype, device=src.device)
    view = buffer.as_strided(src.shape, src.stride(), offset)
    view.copy_(src)
    return view


def make_lists(
    shapes, dtypes, device, gen: torch.Generator, *, momentum=True, inv_scale=False, channels_last=False
) -> Lists:
    """Random lists; tensor ``i`` has dtype ``dtypes[i % len(dtypes)]``."""

    def rand(shape, dtype, scale=1.0):
        t = (torch.randn(shape, generator=gen) * scale).to(dtype)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    params, grads, moms, backups = [], [], [], []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        # Even-numbered tensors sit at offset 0 (16-byte aligned: the vector paths), the
        # others at odd offsets (the scalar paths).
        offsets = [int(o) for o in torch.randint(1, 7, (4,), generator=gen)]
        if i % 2 == 0:
            offsets = [0, 0, 0, 0]
        # Moved first, then placed: ``.to(device)`` of a view would drop its offset.
        params.append(view_at_offset(rand(shape, dtype).to(device), offsets[0]))
        grads.append(view_at_offset(rand(shape, dtype, 3.0).to(device), offsets[1]))
        moms.append(view_at_offset(rand(shape, torch.float32).to(device), offsets[2]))
        backups.append(view_at_offset(rand(shape, dtype).to(device), offsets[3]))
    n = len(shapes)
    coef = torch.empty(n, COEF_COLUMNS)
    coef[:, RHO] = torch.rand(n, generator=gen) * 0.5 + 0.01
    coef[:, SIGMA] = torch.rand(n, generator=gen) * 1.5
    coef[:, LMBDA] = torch.rand(n, generator=gen)
    coef[:, ADAPTIVE] = (torch.rand(n, generator=gen) < 0.4).float()
    coef[torch.rand(n, generator=gen) < 0.2, LMBDA] = 0.0  # unseeded
    scale = torch.tensor(float(torch.rand((), generator=gen)) * 0.5 + 0.25) if inv_scale else None
    # Each eta is 0 for about half the tensors; with |g| ~ 3, fisher_eta * g^2 is of order 1.
    for column, high in ((ADAPTIVE_ETA, 0.5), (FISHER_ETA, 2.0)):
        coef[:, column] = torch.rand(n, generator=gen) * high * (torch.rand(n, generator=gen) < 0.5)
    return Lists(
        params=params,
        grads=grads,
        momentum=moms if momentum else [],
        backup=backups,
        coef=coef.to(device),
        inv_scale=scale.to(device) if scale is not None else None,
    )


def zero_etas(lists: Lists) -> None:
    """Set both etas of every tensor to 0 (plain F-SAM and ASAM)."""
    lists.coef[:, [ADAPTIVE_ETA, FISHER_ETA]] = 0.0


def direction(lists: Lists, i: int) -> tuple[Tensor, Tensor]:
    """(g * inv_scale, d) in fp32 for tensor i."""
    g = lists.grads[i].float()
    if lists.inv_scale is not None:
        g = g * lists.inv_scale
    if not lists.momentum:
        return g, g
    return g, g - lists.coef[i, SIGMA] * lists.momentum[i]


def normalisation(lists: Lists, i: int, g: Tensor) -> tuple[Tensor, Tensor]:
    """(a, f) in fp32 for tensor i: ``T^2 = a^2 / f`` with ``a = |p| + adaptive_eta`` if
    adaptive else 1, ``f = 1 + fisher_eta * g^2``."""
    row = lists.coef[i]
    p = lists.params[i].float()
    a = p.abs() + row[ADAPTIVE_ETA] if row[ADAPTIVE] else torch.ones_like(p)
    return a, 1.0 + row[FISHER_ETA] * g * g


def step_scale(lists: Lists, i: int, total: Tensor, eps: float) -> Tensor:
    """``rho / (sqrt(total) + eps)`` in fp32, each operation correctly rounded as in the kernels.

    The root is taken in fp64 and rounded once (exact for a square root): torch's own fp32
    sqrt on the CPU is not correctly rounded (torch 2.14: one ulp off for about 1 in 6 inputs).
    """
    root = torch.tensor(math.sqrt(float(total)), dtype=torch.float32, device=total.device)
    return lists.coef[i, RHO] / (root + eps)


def oracle_sq_norm(lists: Lists) -> float:
    total = 0.0
    for i in range(len(lists.params)):
        g, d = direction(lists, i)
        a, f = normalisation(lists, i, g)
        total += float(((a * d) ** 2 / f).double().sum())
    return total


def oracle_perturb(lists: Lists, total: Tensor, eps: float) -> tuple[list[Tensor], list[Tensor]]:
    """Expected (params, momentum) after perturb_ with a finite total."""
    new_p, new_m = [], []
    for i, p in enumerate(lists.params):
        g, d = direction(lists, i)
        a, f = normalisation(lists, i, g)
        scale = step_scale(lists, i, total, eps)
        new_p.append((p.float() + a * a * d / f * scale).to(p.dtype))
        if lists.momentum:
            lmbda = lists.coef[i, LMBDA]
            new_m.append(lists.momentum[i] * lmbda + g * (1.0 - lmbda))
    return new_p, new_m


def unchanged_perturb(lists: Lists, total: Tensor, eps: float) -> tuple[list[Tensor], list[Tensor]]:
    """(params, momentum) after perturb_ by the formula from before the etas, each fp32
    operation in the kernels' order: ``p + ((p * p) * d) * scale`` adaptive, else ``p + d * scale``."""
    new_p, new_m = [], []
    for i, p in enumerate(lists.params):
        g, d = direction(lists, i)
        scale = step_scale(lists, i, total, eps)
        p32 = p.float()
        weighted = (p32 * p32) * d if lists.coef[i, ADAPTIVE] else d
        new_p.append((p32 + weighted * scale).to(p.dtype))
        if lists.momentum:
            lmbda = lists.coef[i, LMBDA]
            new_m.append(lists.momentum[i] * lmbda + g * (1.0 - lmbda))
    return new_p, new_m


def unchanged_norm_term(lists: Lists, i: int) -> Tensor:
    """Tensor i's fp32 norm terms by the formula from before the etas: ``(p*d)^2`` adaptive, else ``d^2``."""
    _, d = direction(lists, i)
    ad = lists.params[i].float() * d if lists.coef[i, ADAPTIVE] else d
    return ad * ad


def clone(ts: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in ts]


def poison(ts: list[Tensor]) -> None:
    for t in ts:
        t.fill_(math.nan)


def bits(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).view(torch.uint8).cpu() if t.numel() else t.detach().reshape(-1).cpu()


def assert_bits_equal(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.stride() == e.stride() or a.numel() <= 1, f"{what}[{i}] layout changed"
        mask = mismatches(a, e, rtol=None)
        if mask.any():
            raise AssertionError(describe(f"{what}[{i}]", a, e, mask, "bit for bit")[0] + f"; {layout(a)}")


def _element_report(lists: Lists, before: Lists, i: int, index: tuple, scalars: str) -> str:
    """The inputs of tensor i at ``index`` (from ``before`` the op) and the layouts of its tensors."""
    inputs = [f"p={value(before.params[i], index)}", f"g={value(before.grads[i], index)}"]
    if before.momentum:
        inputs.append(f"m={value(before.momentum[i], index)}")
    return (
        f"\n  inputs there: {', '.join(inputs)}\n  coef row {i}: {_coef_row(lists, i)}; {scalars}"
        f"\n  layouts: {_layouts(lists, i)}\n  {_context(lists)}"
    )


def _coef_row(lists: Lists, i: int) -> str:
    row = lists.coef[i].tolist()
    return ", ".join(f"{COEF_NAMES[c]}={row[c]:.9g}" for c in range(COEF_COLUMNS))


def _layouts(lists: Lists, i: int) -> str:
    named = (
        ("params", lists.params),
        ("grads", lists.grads),
        ("momentum", lists.momentum),
        ("backup", lists.backup),
    )
    return "; ".join(f"{name} {layout(ts[i])}" for name, ts in named if ts)


def _context(lists: Lists) -> str:
    inv_scale = "none" if lists.inv_scale is None else f"{float(lists.inv_scale):.9g}"
    momentum = "with" if lists.momentum else "without"
    return (
        f"lists: {len(lists.params)} tensors on {lists.coef.device}, {momentum} momentum, "
        f"inv_scale {inv_scale}; redraw with {lists.label or 'the test seed'}"
    )


def _assert_close_to_oracle(
    what: str, actual, expected, tol: dict | None, lists: Lists, before: Lists, scalars
) -> None:
    """Element-wise comparison; ``tol`` None means the op tolerance of the parameter dtype."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        t = tol or testing.op(a.dtype)
        mask = mismatches(a, e, **t)
        if mask.any():
            line, index = describe(f"{what}[{i}]", a, e, mask, f"rtol {t['rtol']}, atol {t['atol']}")
            raise AssertionError(line + _element_report(lists, before, i, index, scalars))


def _part(lists: Lists, i: int, index: tuple | None = None) -> Lists:
    """Tensor i alone or, with ``index``, a one-element view of its element ``index``."""

    def pick(tensors: list[Tensor]) -> list[Tensor]:
        return [tensors[i] if index is None else tensors[i][index].reshape(1)] if tensors else []

    parts = (pick(lists.params), pick(lists.grads), pick(lists.momentum), pick(lists.backup))
    return Lists(*parts, lists.coef[i : i + 1], lists.inv_scale, lists.label)


def _sq_norm_report(ops: Ops, lists: Lists, total: float, expected: float) -> str:
    """Which tensor's norm differs on its own (each run through the op alone)."""
    message = f"sq_norm: got {total:.9g}, expected {expected:.9g}"
    for i in range(len(lists.params)):
        alone = _part(lists, i)
        got, want = float(ops.sq_norm(alone)), oracle_sq_norm(alone)
        if not math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-30):
            return (
                f"{message}\n  tensor {i} alone: got {got:.9g}, expected {want:.9g}\n  coef row {i}: "
                f"{_coef_row(lists, i)}\n  layouts: {_layouts(lists, i)}\n  {_context(lists)}"
            )
    return f"{message}\n  every tensor alone agrees: the sum over tensors differs\n  {_context(lists)}"


def snapshot(lists: Lists) -> Lists:
    """A copy of the lists' values (not their layout) before an op changes them."""
    copies = (clone(lists.params), clone(lists.grads), clone(lists.momentum), clone(lists.backup))
    return Lists(*copies, lists.coef.clone(), lists.inv_scale, lists.label)


class Ops(Protocol):
    """The three ops of one kernel family, taking :class:`Lists`."""

    def sq_norm(self, lists: Lists) -> Tensor: ...

    def perturb_(self, lists: Lists, total: Tensor, eps: float) -> None: ...

    def restore_(self, lists: Lists) -> None: ...


def check_ops_match_oracle(ops: Ops, lists: Lists, eps: float = 1e-12) -> None:
    """sq_norm, perturb_ and restore_ of ``ops`` on ``lists`` against the oracle, outputs poisoned."""
    total = ops.sq_norm(lists)
    assert total.dtype == torch.float32 and total.dim() == 0 and total.device == lists.coef.device
    expected_total = oracle_sq_norm(lists)
    if not math.isclose(float(total), expected_total, rel_tol=1e-5, abs_tol=1e-30):
        raise AssertionError(_sq_norm_report(ops, lists, float(total), expected_total))

    before = snapshot(lists)
    expected_p, expected_m = oracle_perturb(lists, total, eps)
    poison(lists.backup)
    ops.perturb_(lists, total, eps)
    scalars = f"total_sq_norm={float(total):.9g}, eps={eps:.3g}"
    assert_bits_equal(lists.backup, before.params, "perturb_ backup")
    _assert_close_to_oracle("perturb_ params", lists.params, expected_p, None, lists, before, scalars)
    _assert_close_to_oracle(
        "perturb_ momentum", lists.momentum, expected_m, testing.MOMENTUM, lists, before, scalars
    )

    poison(lists.params)
    ops.restore_(lists)
    assert_bits_equal(lists.params, before.params, "params after restore_")


def check_zero_etas_are_bit_exact(
    ops: Ops, device, *, with_momentum: bool, inv_scale: bool, label: str = "", dtypes=DTYPES, terms: int = 40
) -> None:
    """With both etas 0, perturb_ gives bit for bit the formula from before the etas on
    random lists of :data:`ZERO_ETA_SHAPES`, and so does each norm term: sq_norm of a
    one-element list is that element's term exactly, whatever order a kernel sums in
    (``terms`` elements are drawn from the lists)."""
    lists = seeded_lists(ZERO_ETA_SHAPES, dtypes, device, with_momentum, inv_scale, f"zero_etas {label}")
    zero_etas(lists)
    gen = torch.Generator().manual_seed(len(lists.params))
    sized = [i for i, p in enumerate(lists.params) if p.numel()]
    for i in (sized[int(k)] for k in torch.randint(len(sized), (terms,), generator=gen)):
        shape = lists.params[i].shape
        at = torch.randint(shape.numel(), (), generator=gen)
        index = tuple(int(x) for x in torch.unravel_index(at, shape))
        element = _part(lists, i, index)
        expected = unchanged_norm_term(element, 0).reshape(())
        assert_bits_equal([ops.sq_norm(element)], [expected], f"sq_norm term of tensor {i} at {index}")

    total, eps = ops.sq_norm(lists), 1e-12
    # rho of the order of the norm makes e as large as p, so that a one-ulp change in e
    # shows in p + e (with e << p it would mostly round away).
    lists.coef[:, RHO] *= 4 * math.sqrt(float(total))
    expected_p, expected_m = unchanged_perturb(lists, total, eps)
    ops.perturb_(lists, total, eps)
    assert_bits_equal(lists.params, expected_p, "perturb_ params with etas 0")
    assert_bits_equal(lists.momentum, expected_m, "perturb_ momentum with etas 0")


# The kernel variants: with or without momentum (F-SAM or SAM), with or without a loss scale.
VARIANTS = {
    f"{'fsam' if m else 'sam'}{'_scaled' if u else ''}": dict(with_momentum=m, inv_scale=u)
    for m in (True, False)
    for u in (True, False)
}


def seeded_lists(shapes, dtypes, device, with_momentum: bool, inv_scale: bool, label: str) -> Lists:
    """:func:`make_lists` seeded from the arguments, so a failure reproduces in another process."""
    key = f"{label}|{shapes}|{dtypes}|{device}|{with_momentum}|{inv_scale}"
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    lists = make_lists(
        shapes,
        dtypes,
        device,
        gen,
        momentum=with_momentum,
        inv_scale=inv_scale,
        channels_last=any(len(s) == 4 for s in shapes),
    )
    lists.label = f"seeded_lists key {key!r}"
    return lists


def check_shapes(
    ops: Ops, shapes, dtypes, device, *, with_momentum: bool, inv_scale: bool, label: str = ""
) -> None:
    """:func:`check_ops_match_oracle` on fresh random lists of ``shapes``."""
    check_ops_match_oracle(ops, seeded_lists(shapes, dtypes, device, with_momentum, inv_scale, label))
