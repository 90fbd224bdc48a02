"""The optimizer inside real training loops: resume, closures, schedulers, BatchNorm."""

import copy
import io

import pytest
import torch
from torch import nn

from fsam_fused import SAM, FriendlySAM, disable_running_stats, enable_running_stats, running_stats_frozen


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4)
    )


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _train_step(model, opt, x, y):
    loss_fn = nn.functional.cross_entropy
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    with running_stats_frozen(model):
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss.detach()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    ("base", "kwargs"),
    [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)), (torch.optim.AdamW, dict(lr=1e-3))],
    ids=["sgd_momentum", "adamw"],
)
def test_resume_from_checkpoint_is_bit_identical(backend, base, kwargs):
    batches = _batches(8)
    model = _model()
    opt = FriendlySAM(model.parameters(), base, rho=0.1, lmbda=0.6, backend=backend, **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    for x, y in batches[:4]:
        _train_step(model, opt, x, y)
        sched.step()
    checkpoint = _roundtrip(
        dict(
            model=copy.deepcopy(model.state_dict()),
            opt=copy.deepcopy(opt.state_dict()),
            sched=sched.state_dict(),
        )
    )
    for x, y in batches[4:]:
        _train_step(model, opt, x, y)
        sched.step()

    resumed_model = _model(seed=123)
    resumed_opt = FriendlySAM(resumed_model.parameters(), base, rho=0.1, lmbda=0.6, backend=backend, **kwargs)
    resumed_sched = torch.optim.lr_scheduler.CosineAnnealingLR(resumed_opt, T_max=8)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    resumed_sched.load_state_dict(checkpoint["sched"])
    for x, y in batches[4:]:
        _train_step(resumed_model, resumed_opt, x, y)
        resumed_sched.step()

    for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(opt.state[p]["momentum"], resumed_opt.state[q]["momentum"])
    assert resumed_opt.param_groups is resumed_opt.base_optimizer.param_groups
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dict_carries_base_state_and_fp32_momentum_for_bf16_params():
    p = nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, backend="torch")
    p.grad = torch.randn_like(p)
    opt.first_step()
    p.grad = torch.randn_like(p)
    opt.second_step()
    sd = _roundtrip(opt.state_dict())
    assert sd["state"][0]["momentum"].dtype == torch.float32
    assert "momentum_buffer" in sd["base_optimizer"]["state"][0]
    q = nn.Parameter(p.detach().clone())
    other = FriendlySAM([q], torch.optim.SGD, lr=0.1, momentum=0.9, backend="torch")
    other.load_state_dict(sd)
    q.grad = torch.zeros_like(q)
    other.first_step()
    assert other.state[q]["momentum"].dtype == torch.float32
    torch.testing.assert_close(other.state[q]["momentum"], 0.9 * sd["state"][0]["momentum"])


def test_loads_a_checkpoint_in_the_authors_format(backend):
    # The authors' optimizer saves state[p] = {"momentum": ..., "old_p": ...} and groups with
    # rho/adaptive and the base optimizer's keys, and no base optimizer state.
    p = nn.Parameter(torch.randn(4))
    momentum = torch.randn(4)
    authors = {
        "state": {0: {"momentum": momentum.clone(), "old_p": torch.randn(4)}},
        "param_groups": [
            dict(
                rho=0.2,
                adaptive=False,
                lr=0.3,
                momentum=0.0,
                dampening=0,
                weight_decay=0,
                nesterov=False,
                maximize=False,
                foreach=None,
                differentiable=False,
                fused=None,
                params=[0],
            )
        ],
    }
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, sigma=0.5, lmbda=0.9, backend=backend)
    opt.load_state_dict(authors)
    assert opt.param_groups[0]["rho"] == 0.2 and opt.param_groups[0]["lr"] == 0.3
    assert opt.param_groups[0]["sigma"] == 0.5
    g = torch.randn(4)
    p.grad = g.clone()
    opt.first_step()
    torch.testing.assert_close(opt.state[p]["momentum"], 0.9 * momentum + 0.1 * g)


def test_closure_step_equals_manual_two_step(backend):
    batches = _batches(3)
    results = []
    for use_closure in (False, True):
        model = _model()
        opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, backend=backend)
        for x, y in batches:
            if use_closure:
                nn.functional.cross_entropy(model(x), y).backward()

                def closure():
                    with running_stats_frozen(model):
                        loss = nn.functional.cross_entropy(model(x), y)
                        loss.backward()
                    return loss

                opt.step(closure)
                opt.zero_grad()
            else:
                _train_step(model, opt, x, y)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("on_base", [False, True])
def test_lr_scheduler_on_either_object_changes_the_base_step(on_base):
    p = nn.Parameter(torch.zeros(2))
    opt = SAM([p], torch.optim.SGD, rho=0.0, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer if on_base else opt, step_size=1, gamma=0.5)
    deltas = []
    for _ in range(2):
        before = p.detach().clone()
        p.grad = torch.ones(2)
        opt.first_step()
        p.grad = torch.ones(2)
        opt.second_step()
        sched.step()
        deltas.append((before - p.detach())[0].item())
    assert deltas == [1.0, 0.5]


def test_add_param_group_reaches_the_base_optimizer_and_takes_defaults():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = FriendlySAM([a], torch.optim.SGD, rho=0.1, lr=0.5, backend="torch")
    a.grad = torch.ones(2)
    opt.first_step()
    opt.second_step(zero_grad=True)
    opt.add_param_group(dict(params=[b], rho=0.2))
    assert opt.base_optimizer.param_groups is opt.param_groups and len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["sigma"] == 1.0
    momentum_a = opt.state[a]["momentum"].clone()
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.first_step()
    opt.second_step()
    torch.testing.assert_close(opt.state[a]["momentum"], 0.9 * momentum_a + 0.1 * torch.ones(2))
    torch.testing.assert_close(b.detach(), torch.full((3,), -0.5))


def test_running_stats_are_frozen_but_batch_statistics_still_normalise():
    model = _model()
    bn = model[1]
    x = torch.randn(8, 3, 8, 8)
    model(x)
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    out_tracked = model(x)
    bn.running_mean.copy_(mean), bn.running_var.copy_(var), bn.num_batches_tracked.copy_(count)
    disable_running_stats(model)
    out_frozen = model(x)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count)
    torch.testing.assert_close(out_frozen, out_tracked)
    enable_running_stats(model)
    model(x)
    assert not torch.equal(bn.running_mean, mean) and bn.num_batches_tracked.item() == count.item() + 1
