"""An unchanged step on kept addresses still does what a fully checked step does.

On an unchanged step the native CPU ops run on addresses kept from an earlier full check
(csrc/host/native_lists.h), without reading the tensors' objects again. The second pass must
still restore into whatever the parameter holds now (FSDP re-points parameters between the
passes; ``p.data = t``; a module converted by swapping tensors) and refuse a parameter whose
shape changed; both passes bump the version counters that autograd checks, show up in the
profiler, and go through the dispatcher while a Python dispatch mode is active. Each test
runs a few unchanged steps first, so the kept addresses are in use, and compares with the
reference backend given the same edits, or with the fully checked path.
"""

import pytest
import torch
from fsam_fused.bench.step_bench import NoBaseStep
from torch.utils._python_dispatch import TorchDispatchMode

from fsam_fused import FriendlySAM
from tests.oracle import PlainSGD
from tests.warm_steps import random_grads, warm_up

SHAPES = [(3, 4), (5,), (2, 2, 2), ()]
# More parameters than the native loops over them work ahead (prefetch distances, blocks), and enough
# that they share them with a helper thread (csrc/host/parallel_tensors.h; with the two_threads fixture).
MANY_SHAPES = [(3,), (2, 2), ()] * 200


def _model(backend: str, base=PlainSGD, shapes=SHAPES) -> tuple[list[torch.nn.Parameter], FriendlySAM]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    opt = FriendlySAM(params, base, lr=0.05, rho=0.1, sigma=1.0, lmbda=0.6, backend=backend)
    return params, opt


def _warm(backend: str, base=PlainSGD, shapes=SHAPES):
    """A model after tests.warm_steps.WARM_STEPS steps, with the next step's first-pass gradients in place."""
    params, opt = _model(backend, base, shapes)
    gen = torch.Generator().manual_seed(1)
    warm_up(opt, lambda: random_grads(params, gen))
    return params, opt, gen


def _run(backend: str, edit, shapes=SHAPES) -> list[torch.Tensor]:
    """Warm steps, then one step with ``edit(params)`` between its two passes; the parameters after."""
    params, opt, gen = _warm(backend, shapes=shapes)
    opt.first_step(zero_grad=True)
    params = edit(params)
    random_grads(params, gen)
    opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in params]


def _new_storage(params):
    for p in params:
        p.data = p.data.clone()  # same values, another allocation: the kept address is stale
    return params


def _swapped(params):
    for p in params:
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().clone()))
    return params


def _last_new_storage(params):
    _new_storage(params[-1:])  # (in the last of the chunks that the threads share)
    return params


@pytest.mark.parametrize(
    "edit, shapes",
    [(_new_storage, SHAPES), (_swapped, SHAPES), (_last_new_storage, MANY_SHAPES)],
    ids=["p.data = clone", "swap_tensors", "many, the last one's p.data = clone"],
)
def test_second_step_restores_into_the_storage_the_parameter_holds_now(backend, edit, shapes, two_threads):
    expected = _run("reference", edit, shapes)
    actual = _run(backend, edit, shapes)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _step_re_pointed_during_its_re_plan(
    backend: str,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Warm steps; then a step that re-plans (params[0] got a new storage), during which params[0]
    is re-pointed again right after the re-plan's scan, as another thread could (to ``mid``), and
    after which it gets back the storage that scan saw; then one more step. Returns the parameters
    after it, ``mid`` and ``mid``'s values before that last step."""
    params, opt, gen = _warm(backend)
    seen = params[0].data.clone()
    params[0].data = seen  # a change the next scan sees: the step re-plans
    mid = seen.clone()
    replan = opt._planner.replan

    def replan_then_re_point(*args, **kwargs):
        replan(*args, **kwargs)
        params[0].data = mid

    opt._planner.replan = replan_then_re_point
    opt.first_step(zero_grad=True)
    opt._planner.replan = replan
    random_grads(params, gen)
    opt.second_step(zero_grad=True)
    params[0].data = seen  # as the re-plan's scan saw it: the next scan sees no change
    random_grads(params, gen)
    mid_before = mid.clone()
    opt.first_step(zero_grad=True)
    random_grads(params, gen)
    opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in params], mid, mid_before


def test_lists_checked_on_a_parameter_the_re_plan_did_not_see_are_not_kept(backend):
    # The ops of a re-planning step check the parameters as they are then; if one is not what the
    # re-plan's scan saw, what they checked must not be kept for later steps, which the scan vouches
    # for: once the parameter is back to what the scan saw, the kept address would be ``mid``'s.
    expected, _, _ = _step_re_pointed_during_its_re_plan("reference")
    actual, mid, mid_before = _step_re_pointed_during_its_re_plan(backend)
    assert torch.equal(mid, mid_before), "a later step wrote the storage the parameter held only mid-step"
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_second_step_refuses_a_parameter_whose_shape_changed_between_the_passes():
    params, opt, _ = _warm("native")
    opt.first_step(zero_grad=True)
    params[0].data = params[0].data.reshape(-1)[:6].clone()
    with pytest.raises(RuntimeError, match="shape"):
        opt.second_step()


@pytest.mark.parametrize("shapes", [SHAPES, MANY_SHAPES], ids=["few", "many"])
@pytest.mark.parametrize("phase", ["first_step", "second_step"])
def test_an_unchanged_step_bumps_the_version_autograd_checks(backend, phase, shapes, two_threads):
    params, opt, gen = _warm(backend, NoBaseStep, shapes)  # (a base step would bump the versions itself)
    if phase == "second_step":
        opt.first_step(zero_grad=True)
        random_grads(params, gen)
    versions = [p._version for p in params]
    momentum = [opt.state[p]["momentum"] for p in params]
    momentum_versions = [m._version for m in momentum]
    with torch.enable_grad():
        saved = sum((p * p).sum() for p in params)  # saves every parameter for its backward
    getattr(opt, phase)()
    assert all(p._version > v for p, v in zip(params, versions, strict=True))
    if phase == "first_step":  # (the momentum's EMA: its views share one counter, bumped once)
        assert all(m._version > v for m, v in zip(momentum, momentum_versions, strict=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_an_unchanged_step_shows_its_ops_in_the_profiler():
    params, opt, gen = _warm("native")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.first_step(zero_grad=True)
        random_grads(params, gen)
        opt.second_step(zero_grad=True)
    names = {event.name for event in prof.events()}
    assert {"fsam_fused::sq_norm", "fsam_fused::perturb_", "fsam_fused::restore_"} <= names, sorted(names)


class _Seen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_under_a_dispatch_mode_an_unchanged_step_goes_through_the_dispatcher():
    params, opt, gen = _warm("native")
    with _Seen() as mode:
        opt.first_step(zero_grad=True)
        random_grads(params, gen)
        opt.second_step(zero_grad=True)
    assert {"fsam_fused.sq_norm", "fsam_fused.perturb_", "fsam_fused.restore_"} <= set(mode.seen), mode.seen


def test_an_unchanged_one_plan_cpu_step_runs_its_first_pass_in_one_call(monkeypatch):
    # The scan and both first-pass kernels in one native call (no Python between them); the
    # separate sq_norm and perturb_ calls are for the other cases (a loss scale, several plans...).
    native = pytest.importorskip("fsam_fused.backends.native", reason="the native extension is not built")
    params, opt, gen = _warm("native")
    calls = []
    first_pass = native.first_pass

    def recorded_first_pass(*args):
        calls.append(first_pass(*args))
        return calls[-1]

    monkeypatch.setattr(native, "first_pass", recorded_first_pass)
    for name in ("sq_norm", "perturb_"):
        monkeypatch.setattr(native, name, lambda *a, name=name: pytest.fail(f"{name} was called on its own"))
    opt.first_step(zero_grad=True)
    assert [(changed, total is not None) for changed, total in calls] == [(False, True)]


def _inference_tensor_steps(backend: str) -> tuple[list[torch.Tensor], FriendlySAM]:
    """Unchanged steps, inside inference mode, of a model of inference tensors (which have no
    version counters to bump); the parameters and the optimizer after them, with the next step's
    gradients in place."""
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        params = [torch.randn(shape, generator=gen) for shape in MANY_SHAPES]
        opt = FriendlySAM(params, PlainSGD, lr=0.05, rho=0.1, sigma=1.0, lmbda=0.6, backend=backend)
        warm_up(opt, lambda: random_grads(params, gen))
    return params, opt


def test_inference_tensors_step_in_inference_mode_as_in_the_reference(backend, two_threads):
    expected, _ = _inference_tensor_steps("reference")
    actual, _ = _inference_tensor_steps(backend)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_inference_tensors_outside_inference_mode_are_refused_as_in_the_reference(backend, two_threads):
    # (Where a version would be bumped: the optimizer's state, made in inference mode, is refused too.)
    _, opt = _inference_tensor_steps(backend)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        opt.first_step()
