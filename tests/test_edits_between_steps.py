"""What users do to the model, its param groups and the optimizer between steps.

Move a parameter to another group, re-wrap one around its storage, convert a module by
swapping tensors, hold or edit ``optimizer.state`` entries (``.data = t`` included), add a
group, reassign ``param_groups``, unscale before a plain step, load a checkpoint: each is
honoured (or refused with an error that says what to do) by the next step, eager or
compiled, and the result matches an independent expectation (the fp64 oracle, an eager twin,
or values written out in the test). Each test failed before the change that made it pass.
"""

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import fsam_fused
from fsam_fused import FriendlySAM
from fsam_fused.param_state import ParamState
from fsam_fused.scan import _compiled_scan_class
from tests.cases import CPU_BACKENDS, CPU_FAST_BACKENDS
from tests.oracle import Oracle, PlainSGD

COMPILED_SCAN = _compiled_scan_class() is not None
NATIVE = fsam_fused.backends.runs_on("native", "cpu")


def _two_pass_step(opt, params, first, second, **kwargs):
    for p, g in zip(params, first):
        p.grad = None if g is None else g.clone()
    opt.first_step(zero_grad=True, **kwargs)
    for p, g in zip(params, second):
        p.grad = None if g is None else g.clone()
    opt.second_step(zero_grad=True, **kwargs)


def _random_grads(params, gen):
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


# ---------------------------------------------------------------- change detection


def test_a_parameter_moved_to_another_group_takes_that_groups_values(backend):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(3)]
    hyper = [dict(rho=0.1, sigma=1.0, lmbda=0.6), dict(rho=0.7, sigma=0.3, lmbda=0.9, adaptive=True)]
    opt = FriendlySAM(
        [dict(params=params[:2], **hyper[0]), dict(params=params[2:], **hyper[1])],
        PlainSGD,
        lr=0.05,
        backend=backend,
    )
    oracle = Oracle(params, [0, 0, 1], hyper, lr=0.05)
    first, second = _random_grads(params, gen), _random_grads(params, gen)
    _two_pass_step(opt, params, first, second)
    oracle.first_step(first)
    oracle.second_step(second)
    # Move params[1] from the end of group 0 to the start of group 1: the flattened order
    # (params[0], params[1], params[2]) does not change, its group does.
    opt.param_groups[1]["params"].insert(0, opt.param_groups[0]["params"].pop(1))
    oracle.groups = [0, 1, 1]
    first = _random_grads(params, gen)
    for p, g in zip(params, first):
        p.grad = g.clone()
    opt.first_step()
    oracle.first_step(first)
    for p, expected in zip(params, oracle.params):
        torch.testing.assert_close(p.detach(), expected)


def test_a_parameter_rewrapped_around_its_storage_is_a_new_member(backend):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(6, generator=gen)) for _ in range(2)]
    opt = FriendlySAM(params, PlainSGD, lr=0.1, backend=backend)
    _two_pass_step(opt, params, _random_grads(params, gen), _random_grads(params, gen))
    rewrapped = torch.nn.Parameter(params[0].data)  # e.g. re-tying a weight after the optimizer exists
    opt.param_groups[0]["params"][0] = rewrapped
    params[0] = rewrapped
    assert "momentum" not in opt.state[rewrapped]  # a new member: no state yet, as in torch.optim
    g = torch.randn(6, generator=gen)
    for p, grad in zip(params, (g, torch.randn(6, generator=gen))):
        p.grad = grad
    opt.first_step()  # KeyError today
    torch.testing.assert_close(opt.state[rewrapped]["momentum"], g)  # seeded afresh


@pytest.mark.skipif(not COMPILED_SCAN, reason="the compiled scan (fsam_fused._C) is not built")
def test_module_conversion_by_swapping_tensors_works_after_a_step(backend):
    # torch.utils.swap_tensors refuses a tensor whose C++ object has other owners; torch.optim's
    # own optimizers hold none, and neither may we. The swapped parameters then step as the same
    # conversion done with `.data` (which test_parameter_swaps checks against the oracle).
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Linear(4, 3))
        opts.append(FriendlySAM(models[-1].parameters(), torch.optim.SGD, lr=0.1, backend=backend))

    def step(model, opt):
        model(x.to(model.weight.dtype)).square().sum().backward()
        opt.first_step(zero_grad=True)
        model(x.to(model.weight.dtype)).square().sum().backward()
        opt.second_step(zero_grad=True)

    for model, opt in zip(models, opts):
        step(model, opt)
    swapped, by_data = models
    swap_before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        swapped.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap_before)
    for p in by_data.parameters():
        p.data = p.data.double()
    assert swapped.weight.dtype == torch.float64
    for model, opt in zip(models, opts):
        step(model, opt)
    for p, q in zip(swapped.parameters(), by_data.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opts[0].state[p]["momentum"], opts[1].state[q]["momentum"])


def test_momentum_storage_replaced_with_data_is_adopted_like_an_assigned_momentum(backend):
    # The forum recipe for moving optimizer state (`state[p]["momentum"].data = t`) is honoured as
    # `state[p]["momentum"] = t` is.
    runs = []
    for how in ("data", "assign"):
        gen = torch.Generator().manual_seed(9)
        p = torch.nn.Parameter(torch.randn(6, generator=gen))
        opt = FriendlySAM([p], PlainSGD, lr=0.1, backend=backend)
        for _ in range(2):
            _two_pass_step(opt, [p], _random_grads([p], gen), _random_grads([p], gen))
        new = torch.arange(6.0)
        if how == "data":
            opt.state[p]["momentum"].data = new
        else:
            opt.state[p]["momentum"] = new
        _two_pass_step(opt, [p], _random_grads([p], gen), _random_grads([p], gen))
        runs.append((p.detach().clone(), opt.state[p]["momentum"].clone()))
    (p_data, m_data), (p_assign, m_assign) = runs
    assert torch.equal(p_data, p_assign)
    assert torch.equal(m_data, m_assign)


@pytest.mark.skipif(not NATIVE, reason="the native backend is not built")
def test_native_kernels_never_receive_a_momentum_tensor_the_checks_refuse():
    p = torch.nn.Parameter(torch.randn(50))
    opt = FriendlySAM([p], PlainSGD, lr=0.1, backend="native")
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):  # the second step runs on prechecked lists
        _two_pass_step(opt, [p], _random_grads([p], gen), _random_grads([p], gen))
    storage = torch.zeros(100)
    # The forum recipe for moving optimizer state assigns `.data`; a wrong tensor here must be
    # refused (or honoured), never written beyond. A view keeps the overrun inside `storage`.
    opt.state[p]["momentum"].data = storage[:1]
    p.grad = torch.randn(50, generator=gen)
    try:
        opt.first_step()
    except (RuntimeError, ValueError):
        return  # refused with an error: fine
    assert torch.equal(storage[1:], torch.zeros(99)), "the kernel wrote beyond the 1-element momentum tensor"


# ---------------------------------------------------------------- optimizer.state


def test_an_entry_held_across_steps_stays_the_optimizers_entry(backend):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = FriendlySAM([a, b], PlainSGD, lr=0.0, rho=0.5, sigma=1.0, lmbda=0.5, backend=backend)
    gen = torch.Generator().manual_seed(3)
    _two_pass_step(opt, [a, b], _random_grads([a, b], gen), _random_grads([a, b], gen))
    entry = opt.state[a]  # as torch.optim users do: state = self.state[p]
    opt.state[b]["momentum"] = torch.zeros(4)  # any other edit of the state
    _two_pass_step(opt, [a, b], _random_grads([a, b], gen), _random_grads([a, b], gen))
    entry["momentum"] = torch.full((4,), 3.0)
    assert opt.state[a] is entry
    torch.testing.assert_close(opt.state_dict()["state"][0]["momentum"], torch.full((4,), 3.0))


# ---------------------------------------------------------------- step lifecycle


def test_skipped_first_step_of_an_added_group_leaves_a_fused_base_as_if_it_never_happened(backend):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    opt = FriendlySAM([a], torch.optim.SGD, lr=0.1, momentum=0.9, fused=True, backend=backend)
    gen = torch.Generator().manual_seed(4)
    _two_pass_step(opt, [a], _random_grads([a], gen), _random_grads([a], gen))
    opt.add_param_group(dict(params=[b]))  # e.g. a head unfrozen for fine-tuning
    first = _random_grads([a, b], gen)
    first[1][0] = math.inf  # an overflow on the new group's first step
    _two_pass_step(opt, [a, b], first, _random_grads([a, b], gen))
    assert opt.skipped_steps == 1
    # A run without that step has no base state for b; torch's fused SGD, told to skip the step
    # that creates b's momentum buffer, leaves one of uninitialised memory.
    assert dict(opt.base_optimizer.state[b]) == {}


def test_plain_step_with_a_grad_scaler_allows_unscaling_to_clip():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8))
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, sam_interval=2, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(5)
    scale = scaler.scale(torch.ones(())).item()
    _two_pass_step(
        opt,
        [p],
        [g * scale for g in _random_grads([p], gen)],
        [g * scale for g in _random_grads([p], gen)],
        grad_scaler=scaler,
    )
    scaler.update()
    assert not opt.sam_due
    g = 10 * torch.randn(8, generator=gen)
    p.grad = g * scaler.scale(torch.ones(())).item()
    before = p.detach().clone()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    opt.plain_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    torch.testing.assert_close(p.detach(), before - 0.1 * g / g.norm(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- param_groups


def test_reassigned_param_groups_are_what_the_base_optimizer_steps():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = FriendlySAM([dict(params=[a]), dict(params=[b])], PlainSGD, lr=0.1, backend="torch")
    gen = torch.Generator().manual_seed(7)
    _two_pass_step(opt, [a, b], _random_grads([a, b], gen), _random_grads([a, b], gen))
    opt.param_groups = [opt.param_groups[0]]  # drop b's group, as torch.optim users may
    b_before = b.detach().clone()
    _two_pass_step(opt, [a, b], _random_grads([a, b], gen), _random_grads([a, b], gen))
    assert opt.base_optimizer.param_groups is opt.param_groups
    assert torch.equal(b.detach(), b_before)


# ---------------------------------------------------------------- torch.compile


def _compiled_setup(backend):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((10,), (3, 4))]
    opt = FriendlySAM(params, PlainSGD, rho=0.1, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(8)
    _two_pass_step(opt, params, _random_grads(params, gen), _random_grads(params, gen))  # the eager step
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    return params, opt, first, gen


def _compiled_step_or_eager_step_asked_for(first, **kwargs) -> bool:
    """Run the compiled first_step; False if it refused with the README's remedy (an eager step).

    Either is a fix: working, or the clear error that _traced_plans raises for parameters that
    changed. Anything else (a dynamo error, a silently stale step) is the bug.
    """
    try:
        first(**kwargs)
    except RuntimeError as error:  # with fullgraph=True, dynamo re-raises it inside its own error
        if "run one eager first_step" in str(error):
            return False
        raise
    return True


def _compiled_step_matches_an_eager_twin(params, opt, first, gen, saved, edit, scale=1.0, **kwargs):
    """Apply ``edit`` to ``opt`` and to an eager twin loaded from ``saved``, take one first_step
    on each (compiled on ``opt``) with the same gradients (times ``scale``) and ``kwargs``, and compare."""
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = FriendlySAM(twin_params, PlainSGD, rho=0.1, lr=0.1, backend=opt.backend)
    twin.load_state_dict(saved)
    edit(opt, params)
    edit(twin, twin_params)
    for p, q, g in zip(params, twin_params, _random_grads(params, gen)):
        p.grad, q.grad = g * scale, g * scale
    twin.first_step(**kwargs)
    if not _compiled_step_or_eager_step_asked_for(first, **kwargs):
        return
    for p, q in zip(params, twin_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum"], twin.state[q]["momentum"], rtol=1e-6, atol=1e-7)


def _compiled_two_pass_step(params, opt, first, gen):
    for p, g in zip(params, _random_grads(params, gen)):
        p.grad = g
    first()
    for p, g in zip(params, _random_grads(params, gen)):
        p.grad = g
    opt.second_step(zero_grad=True)


def test_compiled_first_step_after_load_state_dict_runs_on_the_loaded_state():
    params, opt, first, gen = _compiled_setup("torch")
    best = copy.deepcopy(opt.state_dict())
    _compiled_two_pass_step(params, opt, first, gen)
    # Going back to the best checkpoint mid-run (the parameters too, here left as they are).
    _compiled_step_matches_an_eager_twin(params, opt, first, gen, best, lambda o, _: o.load_state_dict(best))


def test_compiled_first_step_honours_an_assigned_momentum():
    params, opt, first, gen = _compiled_setup("torch")
    _compiled_two_pass_step(params, opt, first, gen)
    saved = copy.deepcopy(opt.state_dict())

    def assign(o, ps):
        o.state[ps[0]]["momentum"] = torch.full((10,), 3.0)

    _compiled_step_matches_an_eager_twin(params, opt, first, gen, saved, assign)


def test_compiled_first_step_after_a_dtype_change_restores_bit_for_bit():
    params, opt, first, gen = _compiled_setup("torch")
    for p in params:
        p.data = p.data.double() + 1e-12  # values that fp32 cannot hold
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _random_grads(params, gen)):
        p.grad = g
    if not _compiled_step_or_eager_step_asked_for(first):
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.second_step(zero_grad=True)  # lr * 0: only the restore moves the parameters
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_compiled_first_step_with_a_grad_scaler_is_one_graph():
    params, opt, first, gen = _compiled_setup("torch")
    saved = copy.deepcopy(opt.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scale = scaler.scale(torch.ones(())).item()
    _compiled_step_matches_an_eager_twin(
        params, opt, first, gen, saved, lambda o, ps: None, scale=scale, grad_scaler=scaler
    )


def test_compiled_first_step_with_zero_grad_is_one_graph():
    params, opt, first, gen = _compiled_setup("torch")
    for p, g in zip(params, _random_grads(params, gen)):
        p.grad = g
    first(zero_grad=True)  # as in the README's training loop
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_compiled_first_step_with_a_parameter_new_to_the_base_skips_cleanly_or_is_refused(backend):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    opt = FriendlySAM([a, b], torch.optim.SGD, lr=0.1, momentum=0.9, fused=True, backend=backend)
    a.grad = torch.randn(6)  # stage one trains a only (b frozen)
    opt.first_step(zero_grad=True)
    a.grad = torch.randn(6)
    opt.second_step(zero_grad=True)
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    overflow = torch.randn(6)
    overflow[0] = math.inf
    b.grad = overflow  # stage two trains b only; its first step overflows
    if not _compiled_step_or_eager_step_asked_for(first, zero_grad=True):
        return
    b.grad = torch.randn(6)
    opt.second_step(zero_grad=True)
    assert opt.skipped_steps == 1
    # As in the eager test of this case: a skipped first step leaves no base state for b.
    assert dict(opt.base_optimizer.state[b]) == {}


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_compiled_first_step_with_zero_grad_is_one_graph_for_any_schedule(backend):
    import torch._dynamo.testing

    torch._dynamo.reset()  # dynamo remembers values it saw change in other tests (automatic dynamic)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((10,), (3, 4))]
    opt = FriendlySAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, fused=True, backend=backend)
    gen = torch.Generator().manual_seed(9)
    _compiled_two_pass_step(params, opt, opt.first_step, gen)  # the eager step
    counter = torch._dynamo.testing.CompileCounter()
    first = torch.compile(opt.first_step, fullgraph=True, backend=counter)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        first(zero_grad=True)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.second_step(zero_grad=True)
        scheduler.step()
        opt.param_groups[0]["rho"] = 0.1 * (step + 2)
    assert counter.frame_count == 1


def test_an_optimizer_pickled_by_the_previous_release_saves_a_state_dict():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, fused=True)
    p.grad = torch.randn(5)
    opt.first_step(zero_grad=True)
    p.grad = torch.randn(5)
    opt.second_step(zero_grad=True)
    # What the release before (dfd4513) pickled: the skip flag and a "stepped once" flag as attributes.
    old_pickle = opt.__getstate__()
    flag = old_pickle["_base_found_inf"] = old_pickle.pop("_base_step").flag
    old_pickle["_base_stepped"] = True
    loaded = FriendlySAM.__new__(FriendlySAM)
    loaded.__setstate__(old_pickle)
    assert loaded.base_optimizer.found_inf is flag
    p.grad = torch.randn(5)
    loaded.first_step(zero_grad=True)
    p.grad = torch.randn(5)
    loaded.second_step(zero_grad=True)
    assert loaded.state_dict()["fsam_fused"]["steps_taken"] == 2


def test_a_participation_change_without_state_edits_does_not_walk_optimizer_state(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = FriendlySAM(params, PlainSGD, lr=0.1, backend="torch")
    for p in params:
        p.grad = torch.randn(4)
    opt.first_step(zero_grad=True)
    for p in params:
        p.grad = torch.randn(4)
    opt.second_step(zero_grad=True)
    walked = []
    original = ParamState._adopt_momentum
    monkeypatch.setattr(
        ParamState, "_adopt_momentum", staticmethod(lambda p, *rest: walked.append(p) or original(p, *rest))
    )
    for p in params[:2]:  # params[2] has no gradient this step: a new pattern, a re-plan
        p.grad = torch.randn(4)
    opt.first_step(zero_grad=True)
    assert walked == []


def test_compiled_first_step_refuses_a_first_pass_already_unscaled_as_the_eager_one_does():
    params, opt, first, gen = _compiled_setup("torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scale = scaler.scale(torch.ones(())).item()
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) ran before first_step"):
        first(grad_scaler=scaler)


def test_momentum_replaced_with_data_after_load_state_dict_is_adopted_by_the_next_eager_step():
    # load_state_dict hands out new momentum tensors before any scan watches them.
    p = torch.nn.Parameter(torch.randn(4))
    opt = FriendlySAM([p], PlainSGD, lr=0.1, lmbda=0.5, backend="torch")
    p.grad = torch.ones(4)
    opt.first_step(zero_grad=True)
    p.grad = torch.ones(4)
    opt.second_step(zero_grad=True)
    opt.load_state_dict(opt.state_dict())
    opt.state[p]["momentum"].data = torch.full((4,), 3.0)
    p.grad = torch.ones(4)
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(opt.state[p]["momentum"], torch.full((4,), 0.5 * 3.0 + 0.5 * 1.0))


@pytest.mark.parametrize(
    "base, kwargs", [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.AdamW, {})], ids=["sgd", "adamw"]
)
def test_a_checkpoint_of_the_previous_release_does_not_mark_unstepped_parameters_ready(base, kwargs):
    # dfd4513 wrote fsam_fused.base_stepped = True after the base optimizer's first step ("stepped
    # once"), here one whose second pass reached no parameter: the base optimizer's own state says
    # which parameters it has stepped, whatever a checkpoint records.
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, generator=gen))
    opt = FriendlySAM([p], base, lr=0.1, fused=True, backend="torch", **kwargs)
    p.grad = torch.randn(1000, generator=gen)
    opt.first_step(zero_grad=True)
    opt.second_step(zero_grad=True)  # the base steps over nothing
    checkpoint = opt.state_dict()
    checkpoint["fsam_fused"]["base_stepped"] = True  # what dfd4513's state_dict() wrote here

    resumed = FriendlySAM([p], base, lr=0.1, fused=True, backend="torch", **kwargs)
    resumed.load_state_dict(checkpoint)
    p.grad = torch.randn(1000, generator=gen)
    p.grad[0] = math.nan
    resumed.first_step(zero_grad=True)
    p.grad = torch.randn(1000, generator=gen)
    resumed.second_step(zero_grad=True)
    assert resumed.skipped_steps == 1
    # Fused SGD leaves its momentum buffer as torch.empty_like memory, fused AdamW zeros.
    assert dict(resumed.base_optimizer.state[p]) == {}


_SWAP_DURING_A_NATIVE_CALL = textwrap.dedent(
    """
    import threading, torch
    from fsam_fused import FriendlySAM
    from fsam_fused.backends import native
    torch.set_num_threads(1)
    n = 16_000_000  # 64 MB: allocated with mmap, so a freed storage is unmapped
    p = torch.nn.Parameter(torch.zeros(n))
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, backend="native")
    p.grad = torch.ones(n)
    opt.first_step(zero_grad=True)
    p.grad = torch.ones(n)
    replacement = [torch.nn.Parameter(torch.zeros(n))]
    in_call = threading.Event()
    restore = native.restore_
    def restore_announced(plan):
        in_call.set()  # the C++ call that follows releases the GIL
        restore(plan)
    native.restore_ = restore_announced
    outcome = []
    def other_thread():
        q = replacement.pop()
        in_call.wait()
        try:
            torch.utils.swap_tensors(p, q)  # legal while nothing else owns p's TensorImpl
            outcome.append("swapped")
        except RuntimeError:
            outcome.append("refused")
        del q  # after a swap: the last owner of p's former TensorImpl
    t = threading.Thread(target=other_thread)
    t.start()
    opt.second_step()
    t.join()
    print(outcome)
    """
)


@pytest.mark.skipif(not hasattr(torch.ops.fsam_fused, "restore_"), reason="the native extension is not built")
def test_a_parameter_swapped_by_another_thread_during_a_native_call_is_not_freed_under_it():
    # The native ops borrow the parameters' tensors for a call (no reference taken): they must hold the
    # GIL, or another thread could swap_tensors the parameter and free what the kernel is writing.
    done = subprocess.run(
        [sys.executable, "-c", _SWAP_DURING_A_NATIVE_CALL], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"the process died (signal {-done.returncode}): {done.stderr[-2000:]}"


def test_a_momentum_assigned_to_a_parameter_with_no_gradient_yet_takes_effect_on_every_backend():
    # Its entry's slot is unseeded until its first gradient; the assigned momentum seeds it, as a
    # whole new entry would, so the next step's d = g - sigma m and m = lmbda m + (1 - lmbda) g.
    t, g = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.5, 1.0, -1.0, 2.0])
    results = []
    for backend in CPU_BACKENDS:
        p, q = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))
        opt = FriendlySAM([p, q], torch.optim.SGD, backend=backend, rho=1.0, sigma=1.0, lmbda=0.5, lr=0.0)
        q.grad = torch.ones(1)
        opt.first_step(zero_grad=True)
        q.grad = torch.ones(1)
        opt.second_step(zero_grad=True)  # p had no gradient: its slot is unseeded
        opt.state[p]["momentum"] = t.clone()
        p.grad = g.clone()
        opt.first_step(zero_grad=True)
        e = p.detach().clone()
        p.grad = torch.zeros(4)
        opt.second_step(zero_grad=True)
        results.append((e, opt.state[p]["momentum"].clone()))
    d = g - t
    for e, m in results:
        torch.testing.assert_close(e, d / d.norm())
        torch.testing.assert_close(m, 0.5 * t + 0.5 * g)
