"""torch.compile traces first_step/second_step without graph breaks and matches eager.

State and plans are built by one eager step first. With a fused base optimizer neither
half reads anything back to the host: first_step compiles to one graph, and second_step
breaks only where torch.optim's own step does."""

import pytest
import torch

from fsam_fused import FriendlySAM
from tests.cases import CPU_FAST_BACKENDS


def _setup(backend, seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((10,), (3, 4), (2, 3, 2, 2))]
    opt = FriendlySAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, fused=True, backend=backend)
    return params, opt


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def _step(params, first_step, second_step, seed):
    for p, g in zip(params, _grads(params, seed)):
        p.grad = g
    first_step()
    for p, g in zip(params, _grads(params, seed + 1)):
        p.grad = g
    second_step()


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_second_step_breaks_only_inside_the_base_optimizer(backend):
    params, opt = _setup(backend)
    _step(params, opt.first_step, opt.second_step, seed=0)
    for p, g in zip(params, _grads(params, 2)):
        p.grad = g
    opt.first_step()
    explanation = torch._dynamo.explain(opt.second_step)()
    assert explanation.graph_count >= 1
    # torch.optim.Optimizer.step graph-breaks on purpose around every step (see
    # torch/optim/optimizer.py, _use_grad_for_differentiable); nothing else may.
    for reason in explanation.break_reasons:
        assert reason.user_stack[-1].filename.endswith("torch/optim/optimizer.py"), reason


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_compiled_steps_match_eager(backend):
    params, opt = _setup(backend)
    eager_params, eager = _setup(backend)
    _step(params, opt.first_step, opt.second_step, seed=0)
    _step(eager_params, eager.first_step, eager.second_step, seed=0)
    # fullgraph=True raises on any graph break inside first_step.
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    second = torch.compile(opt.second_step, backend="aot_eager")
    for seed in range(2, 12, 2):
        _step(params, first, second, seed)
        _step(eager_params, eager.first_step, eager.second_step, seed)
        opt.param_groups[0]["rho"] *= 1.5  # a schedule between steps
        eager.param_groups[0]["rho"] *= 1.5
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum"], eager.state[q]["momentum"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_compiled_first_step_leaves_the_gradients_alone(backend):
    params, opt = _setup(backend)
    _step(params, opt.first_step, opt.second_step, seed=0)
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    given = _grads(params, 2)
    for p, g in zip(params, given):
        p.grad = g.clone()
    first()
    for p, g in zip(params, given):
        assert torch.equal(p.grad, g)
    opt.second_step()


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_compiled_plain_steps_match_eager(backend):
    """A plain step's base optimizer steps on the same gradient the first pass read."""
    params, opt = _setup(backend)
    eager_params, eager = _setup(backend)
    for ps, o in ((params, opt), (eager_params, eager)):
        for p, g in zip(ps, _grads(ps, 0)):
            p.grad = g
        o.plain_step()
    plain = torch.compile(opt.plain_step, backend="aot_eager")
    for seed in range(1, 4):
        for ps, step in ((params, plain), (eager_params, eager.plain_step)):
            for p, g in zip(ps, _grads(ps, seed)):
                p.grad = g
            step()
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum"], eager.state[q]["momentum"], rtol=1e-6, atol=1e-7)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after: past its recompile limit (earlier tests) it runs a
    frame eagerly, and a frame it ran eagerly after a refused trace stays marked for later tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_a_param_group_added_between_compiled_steps_is_refused_or_run_eagerly(backend, fresh_dynamo):
    """The group tables are shaped by an eager step: a traced step with another number of groups
    is refused (fullgraph says why); without fullgraph, Dynamo runs that step eagerly."""
    params, opt = _setup(backend)
    eager_params, eager = _setup(backend)
    _step(params, opt.first_step, opt.second_step, seed=0)
    _step(eager_params, eager.first_step, eager.second_step, seed=0)
    strict = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    lenient = torch.compile(opt.first_step, backend="aot_eager")
    _step(params, strict, opt.second_step, seed=2)
    _step(eager_params, eager.first_step, eager.second_step, seed=2)
    for o in (opt, eager):
        o.add_param_group(dict(params=[], rho=0.2))
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(params, 4)):
        p.grad = g
    with pytest.raises(RuntimeError, match="param group was added or removed since the last eager step"):
        strict()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    _step(params, lenient, opt.second_step, seed=4)
    _step(eager_params, eager.first_step, eager.second_step, seed=4)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_a_schedule_of_every_group_value_is_one_graph(backend):
    import torch._dynamo.testing

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((10,), (3, 4))]
    groups = [dict(params=params[:1]), dict(params=params[1:], rho=0.3, adaptive=True)]
    opt = FriendlySAM(groups, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, fused=True, backend=backend)
    _step(params, opt.first_step, opt.second_step, seed=0)
    counter = torch._dynamo.testing.CompileCounter()
    first = torch.compile(opt.first_step, fullgraph=True, backend=counter)
    keys = ("rho", "sigma", "lmbda", "adaptive_eta", "fisher_eta")
    for i in range(30):  # every key of both groups changes, 3 values each
        opt.param_groups[i % 2][keys[(i // 2) % len(keys)]] = 0.1 + 0.01 * i
        _step(params, first, opt.second_step, seed=2 * i + 2)
    assert counter.frame_count == 1
