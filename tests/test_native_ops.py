"""The compiled ops ``torch.ops.fsam_fused.*`` against a plain per-tensor oracle.

Tensors are views at odd offsets into larger buffers (so vector paths meet unaligned
addresses), shapes cross the vector widths and the CUDA chunk size, outputs are
poisoned before each op, and every check draws fresh random inputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

_ops = pytest.importorskip("fsam_fused._ops", reason="the native extension is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA_CHUNK = 32768
SHAPE_SETS = {
    "vector_widths": [(n,) for n in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33)],
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

gpu_device = pytest.param("cuda", marks=pytest.mark.gpu)
DEVICES = ["cpu", gpu_device]


@dataclass
class Lists:
    params: list[Tensor]
    grads: list[Tensor]
    momentum: list[Tensor]
    backup: list[Tensor]
    coef: Tensor
    inv_scale: Tensor | None


def _view_at_odd_offset(src: Tensor, offset: int) -> Tensor:
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
        offsets = [int(o) for o in torch.randint(1, 7, (4,), generator=gen)]
        params.append(_view_at_odd_offset(rand(shape, dtype), offsets[0]).to(device))
        grads.append(_view_at_odd_offset(rand(shape, dtype, 3.0), offsets[1]).to(device))
        moms.append(_view_at_odd_offset(rand(shape, torch.float32), offsets[2]).to(device))
        backups.append(_view_at_odd_offset(rand(shape, dtype), offsets[3]).to(device))
    for lst in (params, grads, moms, backups):
        for t in lst:
            assert not t.is_contiguous() or t.numel() <= 1 or t.storage_offset() > 0
    n = len(shapes)
    coef = torch.stack(
        [
            torch.rand(n, generator=gen) * 0.5 + 0.01,  # rho
            torch.rand(n, generator=gen) * 1.5,  # sigma
            torch.rand(n, generator=gen),  # lmbda (0 for some: unseeded)
            (torch.rand(n, generator=gen) < 0.4).float(),  # adaptive
        ],
        dim=1,
    )
    coef[torch.rand(n, generator=gen) < 0.2, 2] = 0.0
    scale = torch.tensor(float(torch.rand((), generator=gen)) * 0.5 + 0.25) if inv_scale else None
    return Lists(
        params=params,
        grads=grads,
        momentum=moms if momentum else [],
        backup=backups,
        coef=coef.to(device),
        inv_scale=scale.to(device) if scale is not None else None,
    )


def _direction(lists: Lists, i: int) -> tuple[Tensor, Tensor]:
    """(g * inv_scale, d) in fp32 for tensor i."""
    g = lists.grads[i].float()
    if lists.inv_scale is not None:
        g = g * lists.inv_scale
    if not lists.momentum:
        return g, g
    return g, g - lists.coef[i, 1] * lists.momentum[i]


def oracle_sq_norm(lists: Lists) -> float:
    total = 0.0
    for i, p in enumerate(lists.params):
        _, d = _direction(lists, i)
        a = p.float().abs() if lists.coef[i, 3] else 1.0
        total += float(((a * d).double() ** 2).sum())
    return total


def oracle_perturb(lists: Lists, total: Tensor, eps: float) -> tuple[list[Tensor], list[Tensor]]:
    """Expected (params, momentum) after perturb_ with a finite total."""
    new_p, new_m = [], []
    for i, p in enumerate(lists.params):
        rho, _, lmbda, adaptive = lists.coef[i]
        g, d = _direction(lists, i)
        scale = rho / (total.sqrt() + eps)
        weighted = p.float() * p.float() * d if adaptive else d
        new_p.append((p.float() + weighted * scale).to(p.dtype))
        if lists.momentum:
            new_m.append(lists.momentum[i] * lmbda + g * (1.0 - lmbda))
    return new_p, new_m


def _clone(ts: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in ts]


def _poison(ts: list[Tensor]) -> None:
    for t in ts:
        t.fill_(math.nan)


def _bits(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).view(torch.uint8).cpu() if t.numel() else t.detach().reshape(-1).cpu()


def assert_bits_equal(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.stride() == e.stride() or a.numel() <= 1, f"{what}[{i}] layout changed"
        assert torch.equal(_bits(a.contiguous()), _bits(e.contiguous())), f"{what}[{i}] is not bit-identical"


def _tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}


CASES = [
    pytest.param(shapes, dtypes, id=f"{name}-{'+'.join(str(d)[6:] for d in dtypes)}")
    for name, shapes in SHAPE_SETS.items()
    for dtypes in ([torch.float32], [torch.bfloat16], [torch.float16], DTYPES)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_momentum", [True, False], ids=["fsam", "sam"])
@pytest.mark.parametrize("shapes,dtypes", CASES)
def test_ops_match_oracle(shapes, dtypes, with_momentum, device):
    gen = torch.Generator().manual_seed(hash((len(shapes), str(dtypes), with_momentum)) % 2**31)
    lists = make_lists(
        shapes,
        dtypes,
        device,
        gen,
        momentum=with_momentum,
        inv_scale=with_momentum,
        channels_last=any(len(s) == 4 for s in shapes),
    )
    eps = 1e-12

    total = _ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, lists.inv_scale)
    assert total.dtype == torch.float32 and total.dim() == 0 and total.device.type == device
    expected_total = oracle_sq_norm(lists)
    assert math.isclose(float(total), expected_total, rel_tol=1e-5, abs_tol=1e-30)

    old_params = _clone(lists.params)
    expected_p, expected_m = oracle_perturb(lists, total, eps)
    _poison(lists.backup)
    _ops.perturb_(
        lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, eps, lists.inv_scale
    )
    assert_bits_equal(lists.backup, old_params, "backup")
    for i, (a, e) in enumerate(zip(lists.params, expected_p, strict=True)):
        torch.testing.assert_close(a, e, **_tolerance(a.dtype), msg=lambda m, i=i: f"params[{i}]: {m}")
    for i, (a, e) in enumerate(zip(lists.momentum, expected_m, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"momentum[{i}]: {m}")

    _poison(lists.params)
    _ops.restore_(lists.params, lists.backup)
    assert_bits_equal(lists.params, old_params, "params after restore_")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_total", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_total_leaves_params_and_momentum_bit_identical(dtype, bad_total, device):
    gen = torch.Generator().manual_seed(7)
    lists = make_lists(SHAPE_SETS["vector_widths"] + [(CUDA_CHUNK + 3,)], [dtype], device, gen)
    lists.grads[0].view(-1)[0] = math.inf  # an Inf gradient must not leak either
    old_p, old_m = _clone(lists.params), _clone(lists.momentum)
    _poison(lists.backup)
    total = torch.tensor(bad_total, device=device)
    _ops.perturb_(lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, 1e-12, None)
    assert_bits_equal(lists.params, old_p, "params")
    assert_bits_equal(lists.momentum, old_m, "momentum")
    assert_bits_equal(lists.backup, old_p, "backup")


@pytest.mark.parametrize("device", DEVICES)
def test_inf_gradient_makes_the_norm_non_finite(device):
    gen = torch.Generator().manual_seed(3)
    lists = make_lists([(100,), (40000,)], [torch.float32], device, gen)
    lists.grads[1].view(-1)[12345] = math.inf
    total = _ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, None)
    assert not math.isfinite(float(total))


def test_norm_is_bitwise_independent_of_thread_count():
    gen = torch.Generator().manual_seed(11)
    shapes = [(1 << 20,), (300_001,), (17,), (2048, 513)] + [(5,)] * 50
    lists = make_lists(shapes, DTYPES, "cpu", gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, None))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(_bits(r), _bits(results[0])) for r in results), [float(r) for r in results]


def test_empty_lists_give_zero_norm_and_no_op():
    coef = torch.empty((0, 4))
    assert float(_ops.sq_norm([], [], [], coef, None)) == 0.0
    _ops.perturb_([], [], [], [], coef, torch.tensor(1.0), 1e-12, None)
    _ops.restore_([], [])


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda ls: ls.grads.pop(), "grads has"),
        (lambda ls: ls.momentum.__setitem__(0, ls.momentum[0].double()), "momentum[0] must be float32"),
        (lambda ls: ls.params.__setitem__(0, ls.params[0].double()), "params[0] has dtype"),
        (lambda ls: ls.backup.__setitem__(1, ls.backup[1].t().contiguous().t()), "backup[1] has strides"),
        (lambda ls: setattr(ls, "coef", ls.coef[:, :3].contiguous()), "coef must be"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(mutate, message):
    gen = torch.Generator().manual_seed(5)
    lists = make_lists([(3,), (4, 5)], [torch.float32], "cpu", gen)
    mutate(lists)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        total = torch.tensor(1.0)
        _ops.perturb_(lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, 1e-12, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_momentum", [True, False], ids=["fsam", "sam"])
def test_opcheck_passes_for_every_op(with_momentum, device):
    gen = torch.Generator().manual_seed(13)
    lists = make_lists(
        [(), (5,), (3, 7), (33,)],
        [torch.float32, torch.bfloat16],
        device,
        gen,
        momentum=with_momentum,
        inv_scale=True,
    )
    total = _ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, lists.inv_scale)
    torch.library.opcheck(
        torch.ops.fsam_fused.sq_norm.default, (lists.params, lists.grads, lists.momentum, lists.coef, None)
    )
    torch.library.opcheck(
        torch.ops.fsam_fused.perturb_.default,
        (lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, 1e-12, lists.inv_scale),
    )
    torch.library.opcheck(torch.ops.fsam_fused.restore_.default, (lists.params, lists.backup))
