"""Bad input is refused with an error that names the argument; misuse of the call order too."""

import math

import numpy as np
import pytest
import torch

from fsam_fused import SAM, FriendlySAM
from tests.cases import CPU_BACKENDS


def _param():
    return torch.nn.Parameter(torch.randn(3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(rho=-0.1), ValueError, "rho"),
        (dict(sigma=-1.0), ValueError, "sigma"),
        (dict(lmbda=1.5), ValueError, "lmbda"),
        (dict(lmbda=-0.1), ValueError, "lmbda"),
        (dict(norm_eps=0.0), ValueError, "norm_eps"),
        (dict(norm_eps=-1e-8), ValueError, "norm_eps"),
        (dict(rho="0.1"), TypeError, "rho"),
        (dict(adaptive=1), TypeError, "adaptive"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        FriendlySAM([_param()], torch.optim.SGD, lr=0.1, **kwargs)


def test_invalid_group_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="lmbda"):
        FriendlySAM([dict(params=[_param()], lmbda=2.0)], torch.optim.SGD, lr=0.1)
    opt = FriendlySAM([_param()], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group(dict(params=[_param()], rho=-1.0))


@pytest.mark.parametrize("backend", ["torch", "reference"], indirect=True)
def test_group_hyperparameter_set_invalid_between_steps_is_refused(backend):
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, backend=backend)
    opt.param_groups[0]["rho"] = -0.5
    p.grad = torch.randn(3)
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()


@pytest.mark.parametrize("base", [None, 3, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)])
def test_base_optimizer_must_be_a_class(base):
    with pytest.raises(TypeError, match="base_optimizer"):
        FriendlySAM([_param()], base, lr=0.1)


def test_base_optimizer_that_builds_something_else_is_refused():
    with pytest.raises(TypeError, match="base_optimizer"):
        FriendlySAM([_param()], lambda groups, **kw: object(), lr=0.1)


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        FriendlySAM([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("backend", ["torch", "reference"], indirect=True)
def test_sparse_gradients_are_refused(backend):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FriendlySAM(emb.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()


@pytest.mark.parametrize("backend", ["torch", "reference"], indirect=True)
def test_second_step_before_first_step_is_refused(backend):
    opt = FriendlySAM([_param()], torch.optim.SGD, lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()


@pytest.mark.parametrize("backend", ["torch", "reference"], indirect=True)
def test_first_step_twice_is_refused(backend):
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, backend=backend)
    p.grad = torch.randn(3)
    opt.first_step()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.first_step()


def test_step_without_closure_is_refused():
    opt = SAM([_param()], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()


def test_unavailable_backend_says_how_to_get_it(monkeypatch):
    from fsam_fused import backends

    monkeypatch.setitem(backends._loaded, "native", None)
    monkeypatch.setitem(backends._load_errors, "native", "No module named 'fsam_fused._C'")
    with pytest.raises(RuntimeError, match="pip install"):
        FriendlySAM([_param()], torch.optim.SGD, lr=0.1, backend="native")
    # auto falls back instead of failing
    opt = FriendlySAM([_param()], torch.optim.SGD, lr=0.1, backend="auto")
    opt.param_groups[0]["params"][0].grad = torch.randn(3)
    opt.first_step()
    assert {b.name for b, _ in opt._pending.plans} <= {"torch", "triton"}


def test_non_dense_parameter_is_refused_with_a_clear_error():
    base = torch.randn(4, 6)
    p = torch.nn.Parameter(base[:, ::2])
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, backend="torch")
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="dense"):
        opt.first_step()


@pytest.mark.parametrize("name", ["rho", "sigma"])
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinite_hyperparameters_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        FriendlySAM([_param()], torch.optim.SGD, lr=0.1, **{name: value})


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
def test_numpy_numbers_are_accepted_like_python_numbers(dtype):
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, rho=dtype(0.1), sigma=dtype(1), lmbda=dtype(0.5))
    p.grad = torch.randn(3)
    opt.first_step()
    opt.second_step()


@pytest.mark.parametrize("backend", ["native", "torch", "reference"], indirect=True)
def test_fp64_parameter_in_an_adaptive_group_beside_fp32_ones(backend):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} is not available here")
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = FriendlySAM([a, b], torch.optim.SGD, lr=0.1, adaptive=True, backend=backend)
    ref_a, ref_b = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    ref = FriendlySAM([ref_a, ref_b], torch.optim.SGD, lr=0.1, adaptive=True, backend="reference")
    for p, q in ((a, ref_a), (b, ref_b)):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.first_step()
    ref.first_step()
    torch.testing.assert_close(a, ref_a)
    torch.testing.assert_close(b, ref_b)


def test_add_param_group_between_the_passes_is_refused_and_the_step_completes():
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(p.sum()).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group(dict(params=[_param()]))
    scaler.scale(p.sum()).backward()
    opt.second_step(grad_scaler=scaler)
    scaler.update()


def test_unscale_before_first_step_is_refused():
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(p.sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        opt.first_step(grad_scaler=scaler)


def test_step_with_a_closure_but_no_first_backward_says_what_to_do():
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="no gradient.*automatic_optimization"):
        opt.step(lambda: (p * p).sum().backward())
    assert torch.equal(p, before)
    p.grad = torch.randn(3)
    opt.step(lambda: (p * p).sum().backward())  # usable again


def test_a_closure_that_runs_no_backward_is_refused_and_the_parameters_restored():
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)
    before = p.detach().clone()
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="ran no backward"):
        opt.step(lambda: (p * p).sum())
    assert torch.equal(p, before)


@pytest.mark.parametrize("scaler_in", ["first_step", "second_step"])
def test_a_grad_scaler_given_to_one_pass_only_is_refused_and_abort_step_restores(scaler_in):
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = p.detach().clone()
    scaler.scale(p.sum()).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler if scaler_in == "first_step" else None)
    scaler.scale(p.sum()).backward()
    with pytest.raises(ValueError, match="same GradScaler to both"):
        opt.second_step(grad_scaler=scaler if scaler_in == "second_step" else None)
    assert not torch.equal(p, before)  # nothing done: still at the perturbed point
    opt.abort_step()
    assert torch.equal(p, before)


@pytest.mark.parametrize(
    ("call", "expect"),
    [
        (
            lambda opt, p: opt.step(lambda: (p * p).sum().backward()),
            lambda: pytest.raises(RuntimeError, match=r"^step\(\) was called between"),
        ),
        (  # (warned, not refused: an emergency save on pre-emption may land there)
            lambda opt, p: opt.state_dict(),
            lambda: pytest.warns(UserWarning, match=r"^state_dict\(\) between first_step"),
        ),
    ],
    ids=["step", "state_dict"],
)
def test_a_call_between_the_passes_names_itself_and_the_step_completes(call, expect):
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)
    p.grad = torch.randn(3)
    opt.first_step()
    with expect():
        call(opt, p)
    p.grad = torch.randn(3)
    opt.second_step()
    assert opt.state_dict()["fsam_fused"]["steps_taken"] == 1


@pytest.mark.parametrize("cls", [FriendlySAM, SAM])
def test_eps_goes_to_the_base_optimizer_as_in_the_authors_class(cls):
    opt = cls([_param()], torch.optim.AdamW, lr=1e-3, eps=1e-6, norm_eps=1e-9)
    assert opt.base_optimizer.param_groups[0]["eps"] == 1e-6
    assert opt.eps == 1e-9  # the norm's
    with pytest.raises(TypeError, match="eps.*norm_eps"):  # SGD has none: an error that says what to use
        cls([_param()], torch.optim.SGD, lr=0.1, eps=1e-6)


@pytest.mark.parametrize("name", ["sigma", "lmbda"])
def test_sam_given_an_f_sam_argument_says_to_use_friendly_sam(name):
    with pytest.raises(TypeError, match=f"SAM takes no {name}.*FriendlySAM"):
        SAM([_param()], torch.optim.SGD, lr=0.1, **{name: 0.5})


def test_a_disabled_grad_scaler_counts_as_none_and_another_scaler_is_refused():
    p = _param()
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)
    off = torch.amp.GradScaler("cpu", enabled=False)
    p.grad = torch.randn(3)
    opt.first_step(zero_grad=True)
    p.grad = torch.randn(3)
    opt.second_step(grad_scaler=off)  # a no-op scaler: as if none
    first, other = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    first.scale(p.sum()).backward()
    opt.first_step(zero_grad=True, grad_scaler=first)
    other.scale(p.sum()).backward()
    with pytest.raises(ValueError, match="another grad_scaler"):
        opt.second_step(grad_scaler=other)
    opt.second_step(grad_scaler=first)
