"""What real training code does around the two halves of a step, and what the optimizer keeps.

Gradients are not kept past the step that used it; plans stay bounded whatever the set of
parameters with gradients; a failed second pass can be undone; copies and pickles work;
``optimizer.state`` edits are honoured as in the authors' optimizer.
"""

import copy
import gc
import pickle
import weakref
from collections import defaultdict

import pytest
import torch

from fsam_fused import SAM, FriendlySAM
from fsam_fused.plan import MAX_CACHED_PLANS
from tests.cases import CPU_BACKENDS, random_step
from tests.memory import resident_bytes
from tests.oracle import PlainSGD


def _params(seed=0, shapes=((5,), (3, 4), (7,))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def test_first_pass_gradients_are_not_kept_after_first_step(backend):
    params = _params()
    opt = FriendlySAM(params, PlainSGD, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(1)
    random_step(opt, params, gen)  # plans built
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    refs = [weakref.ref(p.grad) for p in params]
    opt.first_step(zero_grad=True)
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.second_step(zero_grad=True)


def test_plans_stay_bounded_and_every_participation_pattern_matches_the_reference(backend):
    params = _params(shapes=[(17,)] * 10)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FriendlySAM(params, PlainSGD, lr=0.1, backend=backend)
    ref = FriendlySAM(ref_params, PlainSGD, lr=0.1, backend="reference")
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        mask = torch.rand(len(params), generator=gen) < 0.5
        for half in range(2):
            for i, (p, q) in enumerate(zip(params, ref_params)):
                g = torch.randn(p.shape, generator=gen) if mask[i] or half else None
                p.grad, q.grad = g, (g.clone() if g is not None else None)
            (opt.first_step if half == 0 else opt.second_step)(zero_grad=True)
            (ref.first_step if half == 0 else ref.second_step)(zero_grad=True)
        assert len(opt._planner.cache) <= MAX_CACHED_PLANS
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum"], ref.state[q]["momentum"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "torch"], indirect=True)
def test_memory_is_flat_under_changing_participation(backend):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} is not available here")
    params = _params(shapes=[(32768,)] * 30)  # 3.75 MiB per model-sized fp32 buffer
    opt = FriendlySAM(params, PlainSGD, lr=0.0, backend=backend)
    gen = torch.Generator().manual_seed(3)

    def steps(n):
        for _ in range(n):
            mask = torch.rand(len(params), generator=gen) < 0.5
            for half in range(2):
                for i, p in enumerate(params):
                    p.grad = torch.ones_like(p) if mask[i] or half else None
                (opt.first_step if half == 0 else opt.second_step)(zero_grad=True)

    steps(3 * MAX_CACHED_PLANS)
    gc.collect()
    before = resident_bytes()
    steps(100)
    gc.collect()
    grown = resident_bytes() - before
    assert grown < 24 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 100 steps"


def test_exception_in_the_closure_restores_the_parameters_and_the_optimizer_stays_usable(backend):
    params = _params()
    opt = FriendlySAM(params, PlainSGD, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(4)
    random_step(opt, params, gen)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)

    def failing_closure():
        raise RuntimeError("out of memory in the second forward")

    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(failing_closure)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    random_step(opt, params, gen)  # usable again


def test_abort_step_puts_the_parameters_back_bit_for_bit(backend):
    params = _params()
    opt = FriendlySAM(params, PlainSGD, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(5)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, b) for p, b in zip(params, before))
    opt.abort_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    opt.abort_step()  # nothing pending: a no-op
    random_step(opt, params, gen)


def _copy_matches_fresh_run(backend, make_copy):
    params = _params()
    opt = FriendlySAM(params, PlainSGD, lr=0.1, rho=0.2, backend=backend)
    gen = torch.Generator().manual_seed(6)
    random_step(opt, params, gen)
    twin = make_copy(opt)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(p is not q for p, q in zip(params, twin_params))
    state = gen.get_state()
    random_step(opt, params, gen)
    gen.set_state(state)
    random_step(twin, twin_params, gen)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum"], twin.state[q]["momentum"])
    assert twin.base_optimizer.param_groups is twin.param_groups


def test_deepcopy_gives_a_working_independent_optimizer(backend):
    _copy_matches_fresh_run(backend, copy.deepcopy)


def test_pickle_round_trip_gives_a_working_optimizer(backend):
    _copy_matches_fresh_run(backend, lambda opt: pickle.loads(pickle.dumps(opt)))


def test_copy_between_the_two_passes_is_refused():
    params = _params()
    opt = FriendlySAM(params, PlainSGD, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        copy.deepcopy(opt)


def test_sam_deepcopy_keeps_no_momentum():
    params = _params()
    opt = SAM(params, PlainSGD, lr=0.1)
    random_step(opt, params, torch.Generator().manual_seed(7))
    twin = copy.deepcopy(opt)
    random_step(twin, [p for g in twin.param_groups for p in g["params"]], torch.Generator().manual_seed(8))
    assert all("momentum" not in entry for entry in twin.state.values())


def test_assigned_momentum_is_used_by_the_next_step(backend):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = FriendlySAM([p], PlainSGD, lr=0.0, rho=0.5, sigma=1.0, lmbda=0.5, backend=backend)
    p.grad = torch.tensor([1.0, 1.0])
    opt.first_step(zero_grad=True)
    p.grad = torch.zeros(2)
    opt.second_step(zero_grad=True)
    opt.state[p]["momentum"] = torch.tensor([3.0, -1.0])  # replaced, as the authors' code allows
    g = torch.tensor([4.0, 1.0])
    p.grad = g.clone()
    before = p.detach().clone()
    opt.first_step()
    d = g - torch.tensor([3.0, -1.0])
    torch.testing.assert_close(p.detach() - before, 0.5 * d / d.norm())
    torch.testing.assert_close(opt.state[p]["momentum"], 0.5 * torch.tensor([3.0, -1.0]) + 0.5 * g)


def test_replaced_state_mapping_restarts_the_momentum_like_the_authors_optimizer(backend):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = FriendlySAM([p], PlainSGD, lr=0.0, rho=0.5, backend=backend)
    p.grad = torch.tensor([1.0, 1.0])
    opt.first_step(zero_grad=True)
    p.grad = torch.zeros(2)
    opt.second_step(zero_grad=True)
    opt.state = defaultdict(dict)
    g = torch.tensor([3.0, 4.0])
    p.grad = g.clone()
    before = p.detach().clone()
    opt.first_step()
    torch.testing.assert_close(p.detach() - before, 0.5 * g / 5.0)  # plain SAM: no momentum
    torch.testing.assert_close(opt.state[p]["momentum"], g)
    opt.second_step()  # (a checkpoint is taken between steps: state_dict() refuses one mid-step)
    saved = opt.state_dict()["state"][0]
    torch.testing.assert_close(saved["momentum"], g)


def test_state_dict_holds_a_momentum_assigned_since_the_last_step(backend):
    params = _params()
    opt = FriendlySAM(params, PlainSGD, lr=0.1, backend=backend)
    random_step(opt, params, torch.Generator().manual_seed(9))
    opt.state[params[1]]["momentum"] = torch.full((3, 4), 2.5)
    saved = opt.state_dict()
    torch.testing.assert_close(saved["state"][1]["momentum"], torch.full((3, 4), 2.5))
    assert type(saved["state"][1]) is dict


def test_state_dict_hooks_see_the_whole_dict_and_load_hooks_run():
    p = torch.nn.Parameter(torch.randn(3))
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, momentum=0.9)
    p.grad = torch.randn(3)
    opt.first_step()
    p.grad = torch.randn(3)
    opt.second_step()
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("save pre"))

    def save_post(o, state_dict):
        seen.append(("save post", "base_optimizer" in state_dict and "fsam_fused" in state_dict))
        return {**state_dict, "note": "from a hook"}

    opt.register_state_dict_post_hook(save_post)
    saved = opt.state_dict()
    assert saved["note"] == "from a hook"

    def load_pre(o, state_dict):
        seen.append("load pre")
        state_dict = dict(state_dict)
        state_dict.pop("note")
        state_dict["fsam_fused"] = {**state_dict["fsam_fused"], "steps_taken": 7}
        return state_dict

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load post", o._pending.steps_taken)))
    opt.load_state_dict(saved)
    assert seen == ["save pre", ("save post", True), "load pre", ("load post", 7)]


def test_a_load_pre_hook_edits_a_copy_and_a_post_hook_a_pre_hook_registers_stays():
    p = torch.nn.Parameter(torch.randn(3))
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)

    def drop_counters(o, sd):
        del sd["fsam_fused"]

    opt.register_load_state_dict_pre_hook(drop_counters)
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert "fsam_fused" in saved  # (torch.optim hands the pre-hooks a shallow copy too)
    calls = []
    handles = []

    def pre(o):
        if not handles:
            hook = o.register_state_dict_post_hook(lambda o, sd: calls.append("base_optimizer" in sd))
            handles.append(hook)

    opt.register_state_dict_pre_hook(pre)
    opt.state_dict()
    opt.state_dict()
    assert calls == [True, True]
