"""Shared random tensor-list cases and the harness that runs a backend against reference.

Every backend's tests use these: random parameter lists (0-d, empty, odd sizes, sizes
across chunk and vector boundaries, many tiny tensors, a few large ones, channels_last),
several param groups with different hyperparameters, adaptive, sigma = 0, gradients that
are None on some steps. Inputs are drawn fresh from a seed for every check, and the
optimizer's backup buffers are poisoned with NaN before every step so that an element a
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

import fsam_fused
from fsam_fused import SAM, FriendlySAM, testing
from fsam_fused.hparams import ADAPTIVE, FISHER_ETA

# The backends that run on CPU tensors in this process, the reference first: triton only in a
# process started with TRITON_INTERPRET=1 (tests/test_triton_interpreter_run.py starts one).
CPU_BACKENDS = [n for n in reversed(fsam_fused.available_backends()) if fsam_fused.backends.runs_on(n, "cpu")]
CPU_FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


@dataclass(frozen=True)
class Case:
    """A parameter list and its groups. Tensor ``i`` goes to group ``i % len(groups)``."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[dict, ...] = (dict(),)
    channels_last: bool = False
    none_grad_prob: float = 0.0
    sam: bool = False
    kwargs: dict = field(default_factory=dict)


def _tiny(n: int, seed: int) -> tuple[tuple[int, ...], ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple((int(torch.randint(1, 8, (1,), generator=g)),) for _ in range(n))


CASES = (
    Case("mixed_shapes", ((), (0,), (1,), (7,), (3, 5), (17, 1, 3), (129,), (1031,), (4, 4, 3, 3))),
    Case("chunk_boundaries", ((65535,), (65536,), (65537,), (2 * 65536 + 3,), (5,))),
    Case("many_tiny", _tiny(300, 1)),
    Case("few_large", ((1 << 18,), (512, 600))),
    Case(
        "groups",
        ((33,), (64, 3), (2, 5, 7), (1000,), (9,), (12, 12)),
        groups=(
            dict(rho=0.1, sigma=1.0, lmbda=0.6),
            dict(rho=0.02, sigma=0.5, lmbda=0.95),
            dict(rho=0.3, sigma=0.0, lmbda=0.9),
        ),
    ),
    Case(
        "adaptive",
        ((31,), (8, 9), (3, 3, 3, 3), (257,)),
        groups=(dict(adaptive=True, rho=0.5), dict(adaptive=False)),
    ),
    Case("sigma_zero", ((100,), (13, 7), ()), groups=(dict(sigma=0.0),)),
    Case("none_grads", ((40,), (41,), (42, 2), (43,), (5, 5)), none_grad_prob=0.35),
    Case("channels_last", ((8, 3, 3, 3), (16, 8, 1, 1), (4, 5, 2, 3), (10,)), channels_last=True),
    Case("sam", ((50,), (7, 7), (65537,)), sam=True, groups=(dict(adaptive=False), dict(adaptive=True))),
)

CASE_IDS = [c.name for c in CASES]


def make_params(case: Case, dtype: torch.dtype, device: str | torch.device, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in case.shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        if case.channels_last and t.dim() == 4:
            t = t.to(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(t))
    return params


def make_groups(case: Case, params: list[Tensor]) -> list[dict]:
    groups = [dict(params=[], **hp) for hp in case.groups]
    for i, p in enumerate(params):
        groups[i % len(groups)]["params"].append(p)
    return [g for g in groups if g["params"]]


def step_grads(case: Case, params: list[Tensor], seed: int, step: int, half: int) -> list[Tensor | None]:
    """Random gradients for one backward pass (``half`` 0 or 1), deterministic in the seed."""
    g = torch.Generator().manual_seed(seed * 1000 + step * 2 + half + 1)
    grads: list[Tensor | None] = []
    for p in params:
        grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        if case.channels_last and p.dim() == 4:
            grad = grad.to(memory_format=torch.channels_last)
        drop = case.none_grad_prob > 0 and float(torch.rand((), generator=g)) < case.none_grad_prob
        grads.append(None if drop and half == 0 else grad)
    return grads


def build_optimizer(case: Case, params: list[Tensor], backend: str, base=torch.optim.SGD, **base_kwargs):
    base_kwargs = {"lr": 0.05, "momentum": 0.9, **base_kwargs}
    cls = SAM if case.sam else FriendlySAM
    defaults = dict(rho=0.1) if case.sam else dict(rho=0.1, sigma=1.0, lmbda=0.6)
    groups = make_groups(case, params)
    if case.sam:
        for group in groups:
            group.pop("sigma", None)
            group.pop("lmbda", None)
    return cls(groups, base, backend=backend, **defaults, **case.kwargs, **base_kwargs)


def poison_backups(opt: FriendlySAM) -> None:
    """Fill the optimizer's backup buffers with NaN so that unwritten elements show."""
    opt._sync_state()
    for state in opt._planner.flat.devices.values():
        assert state.backup  # allocates the buffers
        for flat in state.backup_flat.values():
            flat.fill_(math.nan)


def random_step(opt: FriendlySAM, params: list[Tensor], gen: torch.Generator) -> None:
    """One first_step/second_step with fresh random gradients for ``params`` drawn from ``gen``."""
    for half in (opt.first_step, opt.second_step):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        half(zero_grad=True)


def attached_plans(opt: FriendlySAM) -> list:
    """The (backend, plan) pairs of the step the current gradients make, ready for the backend ops
    (what first_step does before it calls them)."""
    planner = opt._planner
    planner.replan(opt._param_lists(), opt.backend, opt._param_state(), opt._describe, None)
    rows = opt._group_rows()
    adaptive, fisher = [row[ADAPTIVE] != 0 for row in rows], [row[FISHER_ETA] != 0 for row in rows]
    for _, plan in planner.plans:
        plan.attach(planner.scan, planner.table(plan.device).refresh(rows), rows, adaptive, fisher, opt.eps)
    return planner.plans


@dataclass
class Trace:
    """What a run produced, step by step."""

    perturbed: list[list[Tensor]] = field(default_factory=list)
    updated: list[list[Tensor]] = field(default_factory=list)
    momentum: list[list[Tensor | None]] = field(default_factory=list)


def run(
    case: Case,
    backend: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    steps: int = 5,
    seed: int = 0,
) -> Trace:
    """Run ``steps`` full F-SAM steps with fixed random gradients; record everything."""
    params = make_params(case, dtype, device, seed)
    opt = build_optimizer(case, params, backend)
    trace = Trace()
    for step in range(steps):
        for p, grad in zip(params, step_grads(case, params, seed, step, 0)):
            p.grad = grad
        poison_backups(opt)
        opt.first_step(zero_grad=True)
        trace.perturbed.append([p.detach().clone() for p in params])
        for p, grad in zip(params, step_grads(case, params, seed, step, 1)):
            p.grad = grad
        opt.second_step(zero_grad=True)
        trace.updated.append([p.detach().clone() for p in params])
        trace.momentum.append([_momentum(opt, p) for p in params])
    return trace


def _momentum(opt: FriendlySAM, p: Tensor) -> Tensor | None:
    """The momentum of ``p`` if it is seeded, else None (the reference's convention)."""
    entry = opt.state.get(p, {})
    if "momentum" not in entry:
        return None
    if "momentum_seeded" in entry and not bool(entry["momentum_seeded"]):
        return None
    return entry["momentum"].detach().clone()


def assert_traces_close(actual: Trace, expected: Trace, dtype: torch.dtype) -> None:
    tol = testing.step(dtype)
    for step, (a_step, e_step) in enumerate(zip(actual.perturbed, expected.perturbed)):
        for i, (a, e) in enumerate(zip(a_step, e_step)):
            assert a.stride() == e.stride() or a.numel() <= 1
            torch.testing.assert_close(
                a.cpu(), e.cpu(), **tol, msg=lambda m: f"perturbed p{i} step {step}: {m}"
            )
    for step, (a_step, e_step) in enumerate(zip(actual.updated, expected.updated)):
        for i, (a, e) in enumerate(zip(a_step, e_step)):
            torch.testing.assert_close(
                a.cpu(), e.cpu(), **tol, msg=lambda m: f"updated p{i} step {step}: {m}"
            )
    for step, (a_step, e_step) in enumerate(zip(actual.momentum, expected.momentum)):
        for i, (a, e) in enumerate(zip(a_step, e_step)):
            assert (a is None) == (e is None), f"momentum p{i} step {step}: seeded differs"
            if a is not None:
                torch.testing.assert_close(
                    a.cpu(),
                    e.cpu(),
                    **testing.step(torch.float32) if dtype == torch.float32 else tol,
                    msg=lambda m: f"momentum p{i} step {step}: {m}",
                )
