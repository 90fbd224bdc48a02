"""SAM every k steps: the two-pass step on every ``sam_interval``-th step, a plain step between.

A plain step is the base optimizer's step on that iteration's gradient, with the momentum EMA
taking the gradient as a SAM step's first pass would (so the EMA keeps averaging every
iteration's gradient); the parameters are not perturbed.
"""

import math

import pytest
import torch

from fsam_fused import FriendlySAM
from tests.oracle import Oracle, PlainSGD

LMBDA = 0.6


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((5,), (3, 4))]


def test_step_with_a_closure_runs_the_closure_on_every_kth_step_only():
    params = _params()
    opt = FriendlySAM(params, PlainSGD, lr=0.1, sam_interval=3)
    calls, due = [], []
    for i in range(9):
        due.append(opt.sam_due)
        for p in params:
            p.grad = torch.randn_like(p)

        def closure(i=i):
            calls.append(i)
            loss = sum((p * p).sum() for p in params)
            loss.backward()
            return loss

        result = opt.step(closure)
        assert (result is None) == (i % 3 != 0)
    assert calls == [0, 3, 6]
    assert due == [i % 3 == 0 for i in range(9)]


def test_plain_step_is_the_base_step_and_the_ema_takes_the_gradient(backend):
    params = _params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FriendlySAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, lmbda=LMBDA, backend=backend)
    base = torch.optim.SGD(twins, lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(2)]
    for step_grads in grads:
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.plain_step(zero_grad=True)
        base.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)  # the perturbation-free step is the base optimizer's, bit for bit
    for i, p in enumerate(params):  # seeded by the first plain step, then averaged
        expected = LMBDA * grads[0][i] + (1 - LMBDA) * grads[1][i]
        torch.testing.assert_close(opt.state[p]["momentum"], expected)


def test_mixed_sam_and_plain_steps_match_the_oracle(backend):
    params = _params(2)
    opt = FriendlySAM(
        params, PlainSGD, lr=0.05, rho=0.2, sigma=1.0, lmbda=LMBDA, sam_interval=2, backend=backend
    )
    hyper = [dict(rho=0.2, sigma=1.0, lmbda=LMBDA)]
    oracle = Oracle(params, [0, 0], hyper, lr=0.05)
    plain = Oracle(params, [0, 0], [dict(hyper[0], rho=0.0)], lr=0.05)  # a plain step: rho 0
    gen = torch.Generator().manual_seed(3)
    for i in range(6):
        first = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, first):
            p.grad = g.clone()
        if opt.sam_due:
            second = [torch.randn(p.shape, generator=gen) for p in params]
            opt.first_step(zero_grad=True)
            for p, g in zip(params, second):
                p.grad = g.clone()
            opt.second_step(zero_grad=True)
            oracle.first_step(first)
            oracle.second_step(second)
        else:
            opt.plain_step(zero_grad=True)
            plain.params, plain.momentum = oracle.params, oracle.momentum
            plain.first_step(first)
            plain.second_step(first)
            oracle.params, oracle.momentum = plain.params, plain.momentum
        for p, e in zip(params, oracle.params):
            torch.testing.assert_close(
                p.detach(), e.float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}: {m}"
            )
        for p, m in zip(params, oracle.momentum):
            torch.testing.assert_close(opt.state[p]["momentum"], m.float(), rtol=1e-5, atol=1e-6)


def test_a_non_finite_plain_step_is_skipped_whole(backend):
    params = _params()
    opt = FriendlySAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.plain_step(zero_grad=True)
    before = [p.detach().clone() for p in params], [opt.state[p]["momentum"].clone() for p in params]
    base_before = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0, 0] = math.nan
    opt.plain_step(zero_grad=True)
    assert opt.skipped_steps == 1
    for a, b in zip(
        [p.detach() for p in params] + [opt.state[p]["momentum"] for p in params], before[0] + before[1]
    ):
        assert torch.equal(a, b)
    for p, b in zip(params, base_before):
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], b)


def test_the_step_count_survives_a_checkpoint():
    params = _params()
    opt = FriendlySAM(params, PlainSGD, lr=0.1, sam_interval=3)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.plain_step(zero_grad=True)
    resumed = FriendlySAM(
        [torch.nn.Parameter(p.detach().clone()) for p in params], PlainSGD, lr=0.1, sam_interval=3
    )
    resumed.load_state_dict(opt.state_dict())
    assert [resumed.sam_due, opt.sam_due] == [False, False]  # step 4 of every 3rd: plain
    assert resumed.state_dict()["fsam_fused"]["steps_taken"] == 4


def test_plain_steps_with_a_grad_scaler_unscale_once_and_back_off_on_overflow():
    params = _params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FriendlySAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(twins, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
        opt.plain_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
        for q, g in zip(twins, grads):
            q.grad = g
        base.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)
    scaler.scale(params[0].sum() * math.inf).backward()
    opt.plain_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 512.0 and opt.skipped_steps == 1


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_sam_interval_names_the_argument(value):
    with pytest.raises(ValueError, match="sam_interval"):
        FriendlySAM(_params(), torch.optim.SGD, lr=0.1, sam_interval=value)
