"""Each param group's hyperparameters are checked when they change, not again at every step
(hparams.CheckedRows): an unchanged group's checked row serves again, a replaced value is checked
and takes effect, and a bad value set between steps is refused before anything moves."""

import numpy as np
import pytest
import torch

from fsam_fused import FriendlySAM, hparams

GROUPS = 3


@pytest.fixture
def checks(monkeypatch):
    """How many times a group's values were checked, by group suffix (' (param group i)')."""
    seen: list[str] = []
    check = hparams.check_values

    def counted(where, *values):
        seen.append(where)
        return check(where, *values)

    monkeypatch.setattr(hparams, "check_values", counted)
    return seen


def _setup(**group0):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, generator=gen)) for _ in range(GROUPS)]
    groups = [dict(params=[p], rho=0.05 * (i + 1)) for i, p in enumerate(params)]
    groups[0].update(group0)
    opt = FriendlySAM(groups, torch.optim.SGD, lr=0.1)
    return params, opt, gen


def _step(opt, params, gen):
    for p in params:
        p.grad = torch.randn(4, generator=gen)
    opt.first_step()
    for p in params:
        p.grad = torch.randn(4, generator=gen)
    opt.second_step()


def test_an_unchanged_group_is_not_checked_again(checks):
    params, opt, gen = _setup()
    _step(opt, params, gen)
    checks.clear()
    _step(opt, params, gen)
    assert checks == []
    opt.param_groups[1]["rho"] = 0.3  # a schedule's new value
    _step(opt, params, gen)
    assert checks == [" (param group 1)"]


def test_a_replaced_value_takes_effect():
    params, opt, gen = _setup()
    _step(opt, params, gen)
    opt.param_groups[2]["rho"] = 0.0
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(4, generator=gen)
    opt.first_step()
    assert torch.equal(params[2], before[2])  # rho 0: not perturbed
    assert not torch.equal(params[1], before[1])
    opt.second_step()


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("rho", -0.5, ValueError, "rho must be >= 0 \\(param group 1\\)"),
        ("rho", torch.tensor(0.1), TypeError, "rho"),
        ("adaptive", 1, TypeError, "adaptive must be True or False \\(param group 1\\)"),
    ],
)
def test_a_bad_value_set_between_steps_is_refused_before_anything_moves(key, value, error, match):
    params, opt, gen = _setup()
    opt.param_groups[1]["adaptive"] = True  # then 1, which == True, is still refused
    _step(opt, params, gen)
    before = [p.detach().clone() for p in params]
    opt.param_groups[1][key] = value
    for p in params:
        p.grad = torch.randn(4, generator=gen)
    with pytest.raises(error, match=match):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    opt.param_groups[1][key] = dict(rho=0.1, adaptive=False)[key]
    opt.first_step()
    opt.second_step()


def test_values_of_other_types_are_checked_at_every_step(checks):
    params, opt, gen = _setup(rho=np.float64(0.05))
    _step(opt, params, gen)
    checks.clear()
    _step(opt, params, gen)
    assert checks == [" (param group 0)"]
