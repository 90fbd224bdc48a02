"""F-SAM with torch.amp.GradScaler: scaled passes, one unscale, overflow in either pass."""

import math

import pytest
import torch

from fsam_fused import FriendlySAM
from tests.cases import CPU_BACKENDS
from tests.test_nonfinite import _host_reads_forbidden


def _setup(backend, fused=False, scale=2.0**12):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7,), (3, 5), (1000,))]
    opt = FriendlySAM(
        params, torch.optim.SGD, rho=0.1, lmbda=0.6, lr=0.1, momentum=0.9, backend=backend, fused=fused
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    return params, opt, scaler


def _scaled_step(params, opt, scaler, first, second, clip=None):
    for p, g in zip(params, first):
        p.grad = scaler.scale(g)
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    for p, g in zip(params, second):
        p.grad = scaler.scale(g)
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()


def _grads(params):
    return [torch.randn_like(p) for p in params]


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no_clip", "clip_after_unscale"])
def test_scaled_steps_match_unscaled_steps(backend, clip):
    params, opt, scaler = _setup(backend)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = FriendlySAM(ref_params, torch.optim.SGD, rho=0.1, lmbda=0.6, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(4):
        first, second = _grads(params), _grads(params)
        _scaled_step(params, opt, scaler, first, second, clip)
        for p, g in zip(ref_params, first):
            p.grad = g.clone()
        ref.first_step(zero_grad=True)
        for p, g in zip(ref_params, second):
            p.grad = g.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref_params, clip)
        ref.second_step(zero_grad=True)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum"], ref.state[q]["momentum"], rtol=1e-5, atol=1e-6)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("fused", [False, True], ids=["foreach_base", "fused_base"])
@pytest.mark.parametrize("where", ["first", "second", "both"])
def test_overflow_in_either_pass_skips_the_whole_step_and_backs_off(backend, fused, where):
    params, opt, scaler = _setup(backend, fused)
    for _ in range(2):
        _scaled_step(params, opt, scaler, _grads(params), _grads(params))
    before = [p.detach().clone() for p in params]
    momentum = [opt.state[p]["momentum"].clone() for p in params]
    base = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in params]
    scale = scaler.get_scale()
    first, second = _grads(params), _grads(params)
    if where in ("first", "both"):
        first[2][17] = math.inf
    if where in ("second", "both"):
        second[0][3] = math.nan
    _scaled_step(params, opt, scaler, first, second)
    for p, b, m, s in zip(params, before, momentum, base):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["momentum"], m)
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], s)
    assert scaler.get_scale() == scale * scaler.get_backoff_factor()
    assert opt.skipped_steps == 1
    _scaled_step(params, opt, scaler, _grads(params), _grads(params))
    assert not torch.equal(params[0], before[0])


def test_overflow_on_the_first_step_leaves_momentum_unseeded(backend):
    params, opt, scaler = _setup(backend)
    second = _grads(params)
    second[1][0, 0] = math.inf
    _scaled_step(params, opt, scaler, _grads(params), second)
    first = _grads(params)
    _scaled_step(params, opt, scaler, first, _grads(params))
    for p, g in zip(params, first):
        torch.testing.assert_close(opt.state[p]["momentum"], g)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"], indirect=True)
def test_scaled_step_with_fused_base_reads_nothing_back(backend):
    params, opt, scaler = _setup(backend, fused=True)
    _scaled_step(params, opt, scaler, _grads(params), _grads(params))
    first, second = _grads(params), _grads(params)
    second[2][5] = math.inf
    with _host_reads_forbidden():
        for p, g in zip(params, first):
            p.grad = scaler.scale(g)
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        for p, g in zip(params, second):
            p.grad = scaler.scale(g)
        opt.second_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
    assert opt.skipped_steps == 1


def test_second_step_twice_in_one_scaler_iteration_is_refused():
    params, opt, scaler = _setup("torch")
    _scaled_step(params, opt, scaler, _grads(params), _grads(params))
    for p in params:
        p.grad = scaler.scale(torch.randn_like(p))
    opt.first_step(grad_scaler=scaler)
    opt.second_step(grad_scaler=scaler)
    for p in params:
        p.grad = scaler.scale(torch.randn_like(p))
    opt.first_step(grad_scaler=scaler)
    with pytest.raises(RuntimeError, match="scaler.update"):
        opt.second_step(grad_scaler=scaler)
