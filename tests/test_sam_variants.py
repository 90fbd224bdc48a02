"""The SAM variants of the normalisation operator T: ASAM with eta and Fisher SAM, in every backend.

``e = rho * T^2 d / ||T d||`` with ``T = (|w| + adaptive_eta if adaptive else 1) /
sqrt(1 + fisher_eta * g^2)`` (DESIGN.md section 1). Checked by hand on small cases, against
the independent fp64 oracle over several steps with groups mixing the variants, and, with
both etas 0, bit for bit against what the native backend computed before the variants
existed (tests/data/native_before_variants.pt, recorded from commit 00a4392).
"""

import math
from pathlib import Path

import pytest
import torch

from fsam_fused import SAM, FriendlySAM
from tests.cases import CPU_BACKENDS
from tests.oracle import Oracle, PlainSGD

VARIANT_GROUPS = [
    dict(rho=0.1, sigma=1.0, lmbda=0.6),  # F-SAM
    dict(rho=0.2, sigma=0.5, lmbda=0.9, adaptive=True, adaptive_eta=0.01),  # F-SAM with ASAM's eta
    dict(rho=0.05, sigma=0.0, lmbda=0.9, fisher_eta=1.0),  # Fisher SAM (no momentum term)
    dict(rho=0.3, sigma=1.0, lmbda=0.5, adaptive=True, adaptive_eta=0.1, fisher_eta=0.5),  # all at once
]
SHAPES = [(17,), (3, 5), (2, 2, 3), (40,), (6,), (1,), (9, 2), (33,)]
TOLERANCE = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=3e-3, atol=3e-3),
}


def _one_step_perturbation(p_values, g_values, backend, **group):
    p = torch.nn.Parameter(torch.tensor(p_values))
    opt = FriendlySAM([p], PlainSGD, lr=0.0, backend=backend, **group)
    p.grad = torch.tensor(g_values)
    opt.first_step()
    return p.detach() - torch.tensor(p_values)


def test_asam_with_eta_by_hand(backend):
    # a = |p| + eta = [2.5, 1.5]; ||a * g|| = sqrt(6.25 + 2.25); e = a^2 g / ||a g||
    e = _one_step_perturbation([2.0, -1.0], [1.0, 1.0], backend, rho=1.0, adaptive=True, adaptive_eta=0.5)
    torch.testing.assert_close(e, torch.tensor([6.25, 2.25]) / math.sqrt(8.5))


def test_fisher_sam_by_hand(backend):
    # f = 1 + g^2 = [2, 5]; ||g / sqrt(f)||^2 = 1/2 + 4/5; e = (g / f) / sqrt(1.3)
    e = _one_step_perturbation([0.5, -0.5], [1.0, 2.0], backend, rho=1.0, fisher_eta=1.0)
    torch.testing.assert_close(e, torch.tensor([0.5, 0.4]) / math.sqrt(1.3))


def test_fsam_with_fisher_takes_the_fisher_of_the_gradient_not_of_the_direction(backend):
    # step 1 seeds m = g1; step 2: d = g2 - m = [2, -1], f = 1 + g2^2 = [10, 2] (from d it would be
    # [5, 2]); e = (d / f) / sqrt(d^2 / f summed) = [0.2, -0.5] / sqrt(0.9)
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
    opt = FriendlySAM([p], PlainSGD, lr=0.0, rho=1.0, sigma=1.0, lmbda=0.5, fisher_eta=1.0, backend=backend)
    for g in ([1.0, 2.0], [3.0, 1.0]):
        before = p.detach().clone()
        p.grad = torch.tensor(g)
        opt.first_step(zero_grad=True)
        e = p.detach() - before
        p.grad = torch.zeros(2)
        opt.second_step(zero_grad=True)
    torch.testing.assert_close(e, torch.tensor([0.2, -0.5]) / math.sqrt(0.9))


def _run_against_oracle(cls, backend, dtype, groups_hp):
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    group_of = [i % len(groups_hp) for i in range(len(params))]
    groups = [
        dict(params=[p for p, g in zip(params, group_of) if g == k], **hp) for k, hp in enumerate(groups_hp)
    ]
    if cls is SAM:
        for group in groups:
            group.pop("sigma", None), group.pop("lmbda", None)
    opt = cls(groups, PlainSGD, lr=0.05, backend=backend)
    # The optimizer's parameter order is group by group; the oracle follows it.
    ordered = [p for group in groups for p in group["params"]]
    group_index = [g for g, group in enumerate(groups) for _ in group["params"]]
    oracle = Oracle(ordered, group_index, groups_hp, lr=0.05, with_momentum=cls is FriendlySAM)
    for step in range(4):
        # Tensors 5 and 6 get their first gradient on step 2: unseeded tensors beside seeded ones.
        first = [
            None if step < 2 and i in (5, 6) else torch.randn(p.shape, generator=gen).to(dtype)
            for i, p in enumerate(ordered)
        ]
        second = [torch.randn(p.shape, generator=gen).to(dtype) for p in ordered]
        for p, g in zip(ordered, first):
            p.grad = g
        opt.first_step(zero_grad=True)
        oracle.first_step(first)
        for i, (a, e) in enumerate(zip(ordered, oracle.params)):
            torch.testing.assert_close(
                a.detach(), e, **TOLERANCE[dtype], msg=lambda m: f"step {step} p{i}: {m}"
            )
        for p, g in zip(ordered, second):
            p.grad = g
        opt.second_step(zero_grad=True)
        oracle.second_step(second)
        if cls is FriendlySAM:
            for p, m in zip(ordered, oracle.momentum):
                if m is not None:
                    torch.testing.assert_close(
                        opt.state[p]["momentum"], m.float(), **TOLERANCE[torch.float32]
                    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_groups_mixing_the_variants_match_the_oracle(backend, dtype):
    _run_against_oracle(FriendlySAM, backend, dtype, VARIANT_GROUPS)


def test_sam_class_variants_match_the_oracle_and_keep_no_momentum(backend):
    groups = [dict(rho=0.1), dict(rho=0.2, adaptive=True, adaptive_eta=0.01), dict(rho=0.05, fisher_eta=1.0)]
    _run_against_oracle(SAM, backend, torch.float32, groups)


GOLDEN = Path(__file__).parent / "data" / "native_before_variants.pt"


def _golden_run(cls, groups_hp, dtype, seed=11, steps=3):
    # The same run as recorded in GOLDEN, with both etas given explicitly as 0.
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33,), (4, 5), (2, 3, 3), (1031,), (7,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    groups = [
        dict(params=params[i :: len(groups_hp)], adaptive_eta=0.0, fisher_eta=0.0, **hp)
        for i, hp in enumerate(groups_hp)
    ]
    opt = cls(groups, torch.optim.SGD, lr=0.05, momentum=0.9, backend="native", rho=0.1)
    out = []
    for _ in range(steps):
        for half in (opt.first_step, opt.second_step):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            half(zero_grad=True)
            out.append([p.detach().clone() for p in params])
    return out


GOLDEN_CASES = {
    "fsam_groups_fp32": (
        FriendlySAM,
        [dict(sigma=1.0, lmbda=0.6), dict(adaptive=True, rho=0.3, sigma=0.5, lmbda=0.9)],
        torch.float32,
    ),
    "fsam_groups_bf16": (
        FriendlySAM,
        [dict(sigma=1.0, lmbda=0.6), dict(adaptive=True, rho=0.3)],
        torch.bfloat16,
    ),
    "sam_asam_fp16": (SAM, [dict(), dict(adaptive=True, rho=0.2)], torch.float16),
}


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_zero_etas_give_the_results_from_before_the_variants_bit_for_bit(case):
    if "native" not in CPU_BACKENDS:
        pytest.skip("the recorded results are the native backend's")
    expected = torch.load(GOLDEN)[case]
    actual = _golden_run(*GOLDEN_CASES[case])
    for half, (a_step, e_step) in enumerate(zip(actual, expected, strict=True)):
        for i, (a, e) in enumerate(zip(a_step, e_step)):
            assert torch.equal(a.view(-1).view(torch.int16 if a.element_size() == 2 else torch.int32),
                               e.view(-1).view(torch.int16 if e.element_size() == 2 else torch.int32)), (
                f"{case}: half-step {half}, tensor {i} differs"
            )  # fmt: skip


@pytest.mark.parametrize("name", ["adaptive_eta", "fisher_eta"])
@pytest.mark.parametrize("value", [-0.01, math.nan, math.inf])
def test_bad_etas_name_the_argument(name, value):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=name):
        FriendlySAM([p], torch.optim.SGD, lr=0.1, **{name: value})
    with pytest.raises(ValueError, match=name):
        SAM([dict(params=[p], **{name: value})], torch.optim.SGD, lr=0.1)
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1)
    opt.param_groups[0][name] = value
    p.grad = torch.randn(3)
    with pytest.raises(ValueError, match=name):
        opt.first_step()


def test_adaptive_eta_weights_of_low_precision_parameters_are_computed_in_fp32(backend):
    gen = torch.Generator().manual_seed(6)
    low = torch.nn.Parameter(torch.randn(1000, generator=gen).bfloat16())
    full = torch.nn.Parameter(torch.randn(100, generator=gen))
    hyper = [dict(rho=0.5, adaptive=True, adaptive_eta=0.01)]
    opt = FriendlySAM([low, full], PlainSGD, lr=0.1, backend=backend, **hyper[0])
    oracle = Oracle([low, full], [0, 0], hyper, lr=0.1)
    grads = [torch.randn(1000, generator=gen).bfloat16(), torch.randn(100, generator=gen)]
    for p, g in zip((low, full), grads):
        p.grad = g.clone()
    before = full.detach().double().clone()
    opt.first_step()
    oracle.first_step(grads)
    # The fp32 parameter's perturbation, against the fp64 oracle: about 1e-6 off when the weights of
    # the bf16 parameter are fp32, 1.5e-4 when they are rounded to bf16 (which moves the global norm).
    torch.testing.assert_close(
        full.detach().double() - before, oracle.params[1].double() - before, rtol=1e-5, atol=0
    )


# Found by tests/test_properties.py: the backends disagreed (native and triton skipped the step,
# reference and torch dropped the element from the norm).
def test_fisher_sam_skips_a_step_whose_squared_direction_overflows_fp32_as_sam_does(backend):
    params = [torch.nn.Parameter(torch.ones(2))]
    before = params[0].detach().clone()
    opt = FriendlySAM(params, PlainSGD, lr=0.1, rho=0.1, fisher_eta=1.0, backend=backend)
    params[0].grad = torch.tensor([1e20, 1.0])  # (1e20)^2 overflows fp32; so does f = 1 + g^2
    opt.first_step(zero_grad=True)
    assert torch.equal(params[0].detach(), before)
    params[0].grad = torch.ones(2)
    opt.second_step(zero_grad=True)
    assert opt.skipped_steps == 1
    assert torch.equal(params[0].detach(), before)
