"""Param groups are taken as torch.optim takes them (a generator, a single tensor, an empty group
beside others), or refused with a clear error where a step would go wrong (a parameter listed
twice, a set)."""

import pytest
import torch
from torch import nn

from fsam_fused import FriendlySAM
from tests.cases import CPU_BACKENDS


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _train(model: nn.Module, opt: FriendlySAM, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 3, generator=gen)
        model(x).square().sum().backward()
        opt.first_step(zero_grad=True)
        model(x).square().sum().backward()
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_groups_given_as_generators_train_like_groups_given_as_lists(backend):
    as_lists, as_generators = _model(), _model()
    opt_lists = FriendlySAM(
        [{"params": list(as_lists[0].parameters())}, {"params": list(as_lists[1].parameters()), "rho": 0.2}],
        torch.optim.SGD,
        lr=0.1,
        backend=backend,
    )
    opt_generators = FriendlySAM(
        [{"params": as_generators[0].parameters()}, {"params": as_generators[1].parameters(), "rho": 0.2}],
        torch.optim.SGD,
        lr=0.1,
        backend=backend,
    )
    assert [len(g["params"]) for g in opt_generators.param_groups] == [2, 2]
    before = [p.detach().clone() for p in as_generators.parameters()]
    _train(as_lists, opt_lists)
    _train(as_generators, opt_generators)
    for p, q, p0 in zip(as_lists.parameters(), as_generators.parameters(), before, strict=True):
        assert not torch.equal(q, p0)  # every layer trained
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_add_param_group_takes_a_generator():
    model = _model()
    opt = FriendlySAM(list(model[0].parameters()), torch.optim.SGD, lr=0.1)
    opt.add_param_group({"params": model[1].parameters()})
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert opt.base_optimizer.param_groups[1]["params"] == list(model[1].parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_empty_first_group_is_taken_and_changes_nothing(backend):
    plain, with_empty = _model(), _model()
    opt_plain = FriendlySAM(plain.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    opt_empty = FriendlySAM(
        [{"params": []}, {"params": list(with_empty.parameters())}], torch.optim.SGD, lr=0.1, backend=backend
    )
    _train(plain, opt_plain)
    _train(with_empty, opt_empty)
    for p, q in zip(plain.parameters(), with_empty.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


@pytest.mark.parametrize(
    "groups",
    [
        lambda w, v: [w, v, w],
        lambda w, v: [{"params": [w, v]}, {"params": [v]}],  # (across groups: torch.optim's own check)
        lambda w, v: [{"params": [w, w]}],
        lambda w, v: [("a", w), ("b", v), ("c", w)],
    ],
    ids=["list", "across-groups", "in-a-group", "named"],
)
def test_a_parameter_listed_twice_is_refused(groups):
    w, v = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="more than once|more than one parameter group"):
        FriendlySAM(groups(w, v), torch.optim.SGD, lr=0.1)


def test_add_param_group_refuses_a_parameter_listed_twice_and_a_set():
    w, v = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2))
    opt = FriendlySAM([v], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [w, w]})
    with pytest.raises(TypeError, match="not a set"):
        opt.add_param_group({"params": {w}})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [v]


def test_groups_that_are_all_empty_are_taken_and_a_later_group_steps():
    opt = FriendlySAM([{"params": []}], torch.optim.SGD, lr=0.1)
    model = _model()
    opt.add_param_group({"params": list(model.parameters())})
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, steps=1)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    "edit",
    [
        lambda opt, p, q: opt.param_groups[1]["params"].append(p),  # a move that forgot group 0
        lambda opt, p, q: setattr(opt, "param_groups", [opt.param_groups[0], *opt.param_groups]),
        lambda opt, p, q: opt.param_groups[1]["params"].append(nn.Parameter(p.data)),  # one memory
    ],
    ids=["in-two-groups", "a-group-twice", "two-parameters-one-memory"],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_parameter_reached_twice_is_refused_at_the_next_step_before_anything_moves(backend, edit):
    p, q = nn.Parameter(torch.arange(4.0)), nn.Parameter(torch.ones(4))
    opt = FriendlySAM([{"params": [p]}, {"params": [q]}], torch.optim.SGD, lr=0.1, backend=backend)
    edit(opt, p, q)
    before = p.detach().clone()
    for t in [t for group in opt.param_groups for t in group["params"]]:
        t.grad = torch.ones(4)
    with pytest.raises(ValueError, match="same (parameter|memory): list each parameter once"):
        opt.first_step()
    assert torch.equal(p, before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_parameters_that_are_views_of_one_buffer_are_taken(backend):
    flat = torch.randn(12)
    p, q = nn.Parameter(flat[:4].view(2, 2)), nn.Parameter(flat[4:])
    p.data, q.data = flat[:4].view(2, 2), flat[4:]  # (nn.Parameter keeps the view's storage)
    opt = FriendlySAM([p, q], torch.optim.SGD, lr=0.1, backend=backend)
    before = flat.clone()
    p.grad, q.grad = torch.ones(2, 2), torch.ones(8)
    opt.first_step(zero_grad=True)
    p.grad, q.grad = torch.ones(2, 2), torch.ones(8)
    opt.second_step(zero_grad=True)
    torch.testing.assert_close(flat, before - 0.1)  # (restored exactly, then lr * grad)
