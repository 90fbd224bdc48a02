"""A parameter whose storage, dtype or layout is replaced after the optimizer's state exists.

``p.data = ...`` (EMA and averaging tools), ``model.half()``, ``model.double()`` and
``model.to(memory_format=torch.channels_last)`` keep the Parameter object and change what
it holds. Every backend must notice at its next step, rebuild what depends on it (flat
buffers, backups, address tables) and carry the momentum over; the run then matches the
independent oracle given the same swaps.
"""

import pytest
import torch

from fsam_fused import FriendlySAM
from tests.oracle import Oracle, PlainSGD

SHAPES = [(4, 3, 3, 3), (10,), (5, 7)]
HYPER = [dict(rho=0.1, sigma=1.0, lmbda=0.6), dict(rho=0.3, sigma=0.5, lmbda=0.9, adaptive=True)]
LR = 0.05

SWAPS = {
    "new_storage": lambda t: t.clone(),
    "half": lambda t: t.half(),
    "double": lambda t: t.double(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t,
}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-6, atol=1e-6),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}  # fmt: skip


def _grads(params, gen):
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
            g = g.contiguous(memory_format=torch.channels_last)
        grads.append(g)
    return grads


def _compare(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, f"{what} {i}: dtype {a.dtype}, oracle {e.dtype}"
        torch.testing.assert_close(a, e, **TOLERANCE[a.dtype], msg=lambda m: f"{what} {i}: {m}")


@pytest.mark.parametrize("swap", list(SWAPS))
def test_swapped_parameters_match_the_oracle_with_the_same_swaps(backend, swap):
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    groups = [0, 1, 0]
    opt = FriendlySAM(
        [dict(params=[params[0], params[2]], **HYPER[0]), dict(params=[params[1]], **HYPER[1])],
        PlainSGD,
        lr=LR,
        backend=backend,
    )
    oracle = Oracle(params, groups, HYPER, lr=LR)
    for step in range(6):
        if step == 2:
            for i, p in enumerate(params):
                p.data = SWAPS[swap](p.data)
                oracle.swap(i, SWAPS[swap])
        first, second = _grads(params, gen), _grads(params, gen)
        for p, g in zip(params, first):
            p.grad = g
        opt.first_step(zero_grad=True)
        oracle.first_step(first)
        _compare([p.detach() for p in params], oracle.params, f"step {step} perturbed p")
        for p, g in zip(params, second):
            p.grad = g
        opt.second_step(zero_grad=True)
        oracle.second_step(second)
        _compare([p.detach() for p in params], oracle.params, f"step {step} updated p")
        momentum = [m.float() for m in oracle.momentum]  # kept in fp32 whatever the parameter dtype
        _compare([opt.state[p]["momentum"] for p in params], momentum, f"step {step} momentum")


def test_restore_after_double_keeps_updates_below_float32_resolution(backend):
    # 100 updates of 1e-10 each: below fp32's resolution at 1.0, well above fp64's. A backup
    # still kept in fp32 after model.double() would round each restore and lose them all.
    p = torch.nn.Parameter(torch.ones(3))
    opt = FriendlySAM([p], PlainSGD, lr=1e-10, rho=0.01, backend=backend)
    p.grad = torch.ones(3)
    opt.first_step(zero_grad=True)
    p.grad = torch.zeros(3)
    opt.second_step(zero_grad=True)
    p.data = p.data.double()
    for _ in range(100):
        p.grad = torch.ones(3, dtype=torch.float64)
        opt.first_step(zero_grad=True)
        p.grad = torch.ones(3, dtype=torch.float64)
        opt.second_step(zero_grad=True)
    torch.testing.assert_close(
        p.detach(), torch.full((3,), 1.0 - 100e-10, dtype=torch.float64), rtol=0, atol=1e-14
    )


def test_a_swap_to_another_shape_asks_for_a_reset_and_a_reset_starts_afresh(backend):
    p = torch.nn.Parameter(torch.randn(6))
    opt = FriendlySAM([p], PlainSGD, lr=0.1, backend=backend)
    for _ in range(2):
        p.grad = torch.randn(6)
        opt.first_step(zero_grad=True)
        p.grad = torch.randn(6)
        opt.second_step(zero_grad=True)
    p.data = torch.randn(2, 4)
    p.grad = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0.*del optimizer.state\[p\]"):
        opt.first_step()
    del opt.state[p]
    g = torch.randn(2, 4)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.first_step()
    torch.testing.assert_close(p.detach() - before, 0.05 * g / g.norm())  # plain SAM, seeded afresh
    torch.testing.assert_close(opt.state[p]["momentum"], g)
