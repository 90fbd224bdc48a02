"""The one-call first pass when Python runs inside the scan, or the scan raises.

NativeLists.first_pass runs the kernels on the kept addresses when the scan of the same call saw no
change. The scan copies a gradient laid out otherwise than its parameter (``at::empty_like(p).copy_(g)``);
for a gradient tensor subclass that copy runs the subclass's ``__torch_dispatch__``: Python runs
inside the scan, after the parameters before it were read, and another thread can re-point one of
them or free a gradient the scan read. From there on the scan holds every gradient, and first_pass
compares the parameters with what was kept (ParamScan::python_may_have_run). And a scan that raised
after recording a change in an entry counts as a change next time, so the next step re-plans.

The gradient subclass stands in for any gradient whose copy runs Python or raises. Each test runs
the one-call path and the several-call path (first_pass hidden, as with a loss scale or a reduced
norm). Also here: a step that does not take the one call attaches its plan once; a state_dict()
taken while the parameters had another dtype leaves no plan on buffers optimizer.state no longer
shows. (Found by review of the one-call change; the tests failed on f8dcfe6, the last two before it.)
"""

import pytest
import torch
from fsam_fused.bench.step_bench import NoBaseStep
from torch.utils._python_dispatch import TorchDispatchMode

from fsam_fused import FriendlySAM
from fsam_fused.plan import DevicePlan
from tests.oracle import PlainSGD
from tests.stale_writes import check_against_reference, first_step_with_a_storage_replaced, run_in_own_process
from tests.warm_steps import random_grads, warm_up

native_backend = pytest.importorskip("fsam_fused.backends.native", reason="the native extension is not built")

PATHS = ["one call", "several calls"]

_ON_COPY = []  # what a test runs inside the scan's copy of a _RelaidGradient (first item), if anything


class _RelaidGradient(torch.Tensor):
    """A gradient tensor subclass over a plain tensor whose strides differ from the parameter's: the
    scan copies it into the parameter's layout, and that copy is handled here, in Python."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), dtype=elem.dtype, device=elem.device
        )
        wrapper.elem = elem
        return wrapper

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten.copy_.default:
            raise NotImplementedError(f"{func} on a _RelaidGradient")
        destination, source = args[0], args[1]
        if _ON_COPY:
            _ON_COPY[0]()
        return destination.copy_(source.elem)


def _grads(params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    params[0].grad = torch.randn(params[0].shape, generator=gen)
    params[1].grad = _RelaidGradient(torch.randn(4, 3, generator=gen).t())  # strides (1, 3), not (4, 1)


def _warm(backend: str):
    """Two parameters (params[1]'s gradient is a _RelaidGradient) after WARM_STEPS steps
    (tests.warm_steps), with the next step's first-pass gradients in place. (The base optimizer
    does nothing, so it reads no gradient.)"""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(5,), (3, 4)]]
    opt = FriendlySAM(params, NoBaseStep, rho=0.5, sigma=1.0, lmbda=0.6, backend=backend)
    warm_up(opt, lambda: _grads(params, gen))
    return params, opt, gen


def _use(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "several calls":
        monkeypatch.delattr(native_backend, "first_pass")


def _step_re_pointed_inside_the_scan(backend: str, path: str, monkeypatch):
    """A first_step during whose scan, in the copy of params[1]'s gradient (after params[0] was
    read), another thread re-points params[0] (see first_step_with_a_storage_replaced)."""
    params, opt, _ = _warm(backend)
    _use(path, monkeypatch)

    def install(pause):
        _ON_COPY.append(pause)
        return _ON_COPY.clear

    return first_step_with_a_storage_replaced(params, opt, install)


@pytest.mark.parametrize("path", PATHS)
def test_first_step_perturbs_the_storage_a_parameter_holds_when_python_ran_inside_the_scan(path):
    check_against_reference(_step_re_pointed_inside_the_scan, path)


_GRADIENT_FREED_INSIDE_THE_SCAN = """
    from fsam_fused import FriendlySAM
    from fsam_fused.backends import native
    from fsam_fused.bench.step_bench import NoBaseStep
    from tests.test_scan_interruptions import _ON_COPY, _RelaidGradient
    params = [torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(3, 4))]
    opt = FriendlySAM(params, NoBaseStep, rho=0.05, backend="native")
    def grads():
        params[0].grad = torch.ones(n)
        params[1].grad = _RelaidGradient(torch.ones(4, 3).t())
    for _ in range(3):
        grads()
        opt.first_step(zero_grad=True)
        grads()
        opt.second_step(zero_grad=True)
    grads()
    if PATH == "several calls":
        del native.first_pass
    _ON_COPY.append(pause)
    def free():
        params[0].grad = None  # the last owner of this step's gradient lets it go
    while_another_thread(lambda: opt.first_step(zero_grad=True), free)
"""


@pytest.mark.parametrize("path", PATHS)
def test_a_gradient_freed_while_python_ran_inside_the_scan_is_not_read(path):
    # On the one-call path the scan holds no gradient (only their addresses): one that another thread
    # frees while the scan runs Python is then read by the kernels after it was unmapped.
    run_in_own_process(_GRADIENT_FREED_INSIDE_THE_SCAN, path)


def _first_step_whose_scan_raises(opt: FriendlySAM) -> None:
    """A first_step whose scan raises in the copy of params[1]'s gradient (after reading params[0])."""

    def fail() -> None:
        raise RuntimeError("this gradient cannot be copied now")

    _ON_COPY.append(fail)
    try:
        with pytest.raises(RuntimeError, match="cannot be copied now"):
            opt.first_step(zero_grad=True)
    finally:
        _ON_COPY.clear()


def _steps_after_a_scan_that_raised(backend: str, path: str, monkeypatch):
    """params[0] gets new values in a new storage; the next first_step's scan raises in the copy of
    params[1]'s gradient (after it read params[0]); the step is then retried, and one more follows.
    Returns the parameters after each first_step and at the end, the former storage of params[0]
    (kept alive) and its values before."""
    params, opt, gen = _warm(backend)
    _use(path, monkeypatch)
    former = params[0].data
    former_before = former.clone()
    params[0].data = former * 2  # new values in a new storage (as loading other weights would)
    _first_step_whose_scan_raises(opt)
    seen = []
    for _ in range(2):  # the retry (same gradients), then one more step
        opt.first_step(zero_grad=True)
        seen.append([p.detach().clone() for p in params])
        _grads(params, gen)
        opt.second_step(zero_grad=True)
        _grads(params, gen)
    seen.append([p.detach().clone() for p in params])
    return seen, former, former_before


@pytest.mark.parametrize("path", PATHS)
def test_steps_after_a_scan_that_raised_perturb_the_storage_the_parameter_holds(path):
    check_against_reference(_steps_after_a_scan_that_raised, path)


class _OwnParameter(torch.nn.Parameter):
    """A Parameter subclass (as some libraries define): the optimizer scans it in Python."""


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["parameter subclass", "dispatch mode"])
def test_a_step_outside_the_one_call_path_attaches_its_plan_once(case, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    kind = _OwnParameter if case == "parameter subclass" else torch.nn.Parameter
    params = [kind(torch.randn(shape, generator=gen)) for shape in [(5,), (3, 4)]]
    opt = FriendlySAM(params, NoBaseStep, rho=0.5, backend="native")
    warm_up(opt, lambda: random_grads(params, gen))
    attach, calls = DevicePlan.attach, []

    def counted_attach(self, *args, **kwargs):
        calls.append(self)
        return attach(self, *args, **kwargs)

    monkeypatch.setattr(DevicePlan, "attach", counted_attach)
    if case == "dispatch mode":
        with _PassThrough():
            opt.first_step(zero_grad=True)
    else:
        opt.first_step(zero_grad=True)
    assert len(calls) == 1, f"an unchanged step with one plan attached it {len(calls)} times"


@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_momentum_after_a_state_dict_taken_while_the_parameters_had_another_dtype(backend_name):
    def run(detour: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(5,), (3, 4)]]
        opt = FriendlySAM(params, PlainSGD, lr=0.05, rho=0.1, sigma=1.0, lmbda=0.6, backend=backend_name)
        for step in range(4):
            if detour and step == 2:
                # E.g. a checkpoint saved while evaluating in float64, the parameters put back after.
                originals = [p.data for p in params]
                for p in params:
                    p.data = p.data.double()
                opt.state_dict()
                for p, original in zip(params, originals, strict=True):
                    p.data = original
            for half in (opt.first_step, opt.second_step):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                half(zero_grad=True)
        return [opt.state_dict()["state"][i]["momentum"].clone() for i in range(len(params))]

    expected, actual = run(detour=False), run(detour=True)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_a_parameter_that_gets_a_gradient_takes_part_after_a_scan_that_raised(backend_name):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(5,), (3, 4)]]
    opt = FriendlySAM(params, NoBaseStep, rho=0.5, backend=backend_name)

    def grads(with_first: bool) -> None:
        params[0].grad = torch.randn(5, generator=gen) if with_first else None
        params[1].grad = _RelaidGradient(torch.randn(4, 3, generator=gen).t())

    warm_up(opt, lambda: grads(with_first=False))  # params[0] frozen: no gradient
    grads(with_first=True)  # params[0] starts training; the scan that reads it raises after it
    _first_step_whose_scan_raises(opt)
    before = params[0].detach().clone()
    opt.first_step(zero_grad=True)  # the retry, same gradients
    assert not torch.equal(params[0].detach(), before), "the retried step did not perturb params[0]"
