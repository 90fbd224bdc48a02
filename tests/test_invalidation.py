"""What a step reuses from the last one, and every kind of change that makes it re-plan.

A step whose parameters, gradients and groups look as they did at the last step reuses that
step's plans (no per-tensor Python work); each kind of change below must be noticed, the step
re-planned with every check, and the result must equal the reference backend given the same
changes. Hyperparameters are not structure: a new value needs no re-plan, only a new table.
"""

import os
import sys
from collections.abc import Callable

import pytest
import torch

import fsam_fused
from fsam_fused import FriendlySAM
from fsam_fused.plan import StepPlanner
from fsam_fused.scan import _compiled_scan_class
from tests.cases import CPU_FAST_BACKENDS
from tests.oracle import PlainSGD

SHAPES = [(4, 3, 3, 3), (10,), (5, 7), (6,)]


def _grad_like(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(p.shape, generator=gen).to(p.dtype)
    return g.contiguous(memory_format=torch.channels_last) if p.dim() == 4 and not p.is_contiguous() else g


# Parameters without gradients added to the model when it is "many", before or after the changed
# ones: these then lie in the last or the first chunk of the loop that the native scan shares
# with a helper thread (csrc/host/parallel_tensors.h).
PADDING = {"few": (0, "before"), "many, changed last": (600, "before"), "many, changed first": (600, "after")}


def _setup(backend: str, padding: tuple[int, str] = (0, "before")):
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
    count, where = padding
    unused = [torch.nn.Parameter(torch.zeros(2)) for _ in range(count)]
    first = unused + params[:2] if where == "before" else params[:2] + unused
    groups = [dict(params=first, rho=0.1), dict(params=params[2:], rho=0.2, adaptive=True)]
    return params, FriendlySAM(groups, PlainSGD, lr=0.05, sigma=1.0, lmbda=0.6, backend=backend)


def _step(opt, params, gen, skip=()):
    for half in (opt.first_step, opt.second_step):
        for i, p in enumerate(params):
            p.grad = None if (i in skip and half == opt.first_step) else _grad_like(p, gen)
        half(zero_grad=True)


def _new_group(opt, params):
    extra = torch.nn.Parameter(torch.ones(3))
    params.append(extra)
    opt.add_param_group(dict(params=[extra], rho=0.05))


# Each change is applied to the params and optimizer of both runs, between two steps.
CHANGES: dict[str, Callable[[FriendlySAM, list], dict | None]] = {
    "gradient_set": lambda opt, params: dict(skip=(1, 3)),
    "gradient_strides": lambda opt, params: dict(grad_layout=torch.contiguous_format),
    "parameter_storage": lambda opt, params: [setattr(p, "data", p.data.clone()) for p in params] and None,
    "parameter_dtype": lambda opt, params: [setattr(p, "data", p.data.double()) for p in params[2:]] and None,
    "parameter_layout": lambda opt, params: setattr(params[0], "data", params[0].data.contiguous()),
    "group_moved": lambda opt, params: opt.param_groups[1]["params"].append(
        opt.param_groups[0]["params"].pop()
    ),
    "group_added": lambda opt, params: _new_group(opt, params),
    "group_removed": lambda opt, params: opt.param_groups.pop() and None,
}


@pytest.fixture
def replans(monkeypatch):
    """Counts re-plans (the full-check path) of every optimizer in the test."""
    count = [0]
    original = StepPlanner.replan

    def counted(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StepPlanner, "replan", counted)
    return count


def _run(backend, change, replans, padding=(0, "before")):
    """Two steps, an unchanged one, the change, two steps in the changed configuration; the
    number of re-plans before the unchanged step, before the change, and at the end."""
    params, opt = _setup(backend, padding)
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        _step(opt, params, gen)
    marks = [replans[0]]
    _step(opt, params, gen)
    marks.append(replans[0])
    extra = CHANGES[change](opt, params) or {}
    for _ in range(2):
        if "grad_layout" in extra:  # parameter 0 stays channels_last, its gradient does not
            for half in (opt.first_step, opt.second_step):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).contiguous()
                half(zero_grad=True)
        else:
            _step(opt, params, gen, skip=extra.get("skip", ()))
    marks.append(replans[0])
    return params, opt, marks


@pytest.mark.parametrize("model", list(PADDING))
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_each_change_is_noticed_once_and_the_result_matches_the_reference(
    backend, change, model, replans, two_threads
):
    params, opt, (start, unchanged, end) = _run(backend, change, replans, PADDING[model])
    assert unchanged == start, "a step with nothing changed re-planned"
    assert end == unchanged + 1, (
        f"{change}: {end - unchanged} re-plans over the two changed steps, expected 1"
    )
    expected_params, expected_opt, _ = _run("reference", change, [0], PADDING[model])
    for i, (p, q) in enumerate(zip(params, expected_params)):
        assert p.dtype == q.dtype and p.stride() == q.stride()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")
        torch.testing.assert_close(
            opt.state[p]["momentum"], expected_opt.state[q]["momentum"], rtol=1e-5, atol=1e-6
        )


def test_a_new_hyperparameter_value_needs_no_replan_and_takes_effect(backend, replans):
    params, opt = _setup(backend)
    gen = torch.Generator().manual_seed(1)
    _step(opt, params, gen)
    count = replans[0]
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["rho"] = 0.0  # no perturbation for group 0 from now on
    for p in params:
        p.grad = _grad_like(p, gen)
    opt.first_step()
    assert replans[0] == count
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert not torch.equal(params[2], before[2])


def _lines_run_in_fsam_fused_by_an_unchanged_step(n_params: int, **base_kwargs) -> int:
    """How many lines of fsam_fused's Python one step runs, when nothing changed since the last one."""
    root = os.path.dirname(fsam_fused.__file__)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(n_params)]
    opt = FriendlySAM(params, torch.optim.SGD, lr=0.1, **base_kwargs)

    def give_grads():
        for p in params:
            p.grad = torch.ones(3)

    for _ in range(2):
        give_grads()
        opt.first_step(zero_grad=True)
        give_grads()
        opt.second_step(zero_grad=True)
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if not frame.f_code.co_filename.startswith(root):
            return None
        lines += event == "line"
        return tracer

    give_grads()
    sys.settrace(tracer)
    try:
        opt.first_step(zero_grad=True)
        give_grads()
        opt.second_step(zero_grad=True)
    finally:
        sys.settrace(None)
    return lines


# Without the extension the scan itself is Python, one iteration per parameter, by design.
needs_compiled_scan = pytest.mark.skipif(_compiled_scan_class() is None, reason="needs fsam_fused._C")


@needs_compiled_scan
def test_an_unchanged_step_with_a_non_fused_base_runs_no_python_per_parameter():
    assert _lines_run_in_fsam_fused_by_an_unchanged_step(4) == _lines_run_in_fsam_fused_by_an_unchanged_step(
        64
    )


@needs_compiled_scan
def test_an_unchanged_step_with_a_fused_base_runs_no_python_per_parameter():
    # (Also shows that the count above can match.)
    assert _lines_run_in_fsam_fused_by_an_unchanged_step(4, fused=True) == (
        _lines_run_in_fsam_fused_by_an_unchanged_step(64, fused=True)
    )
