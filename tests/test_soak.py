"""Soak: 10,000 steps with churning participation, and memory stays flat (marked slow, not in CI).

Each step a different subset of the parameters gets gradients (mixture-of-experts routing, frozen
or conditional layers), mostly a fresh pattern, sometimes one of a few recurring ones, so the plan
cache is missed, hit and evicted all the time. After a warm-up, resident memory and the number of
live Python container objects must stay flat, and the plan cache within ``MAX_CACHED_PLANS``.

    python -m pytest -m slow tests/test_soak.py -s   (-s prints the memory samples)
"""

import gc

import pytest
import torch

from fsam_fused import FriendlySAM
from fsam_fused.plan import MAX_CACHED_PLANS
from tests.cases import CPU_BACKENDS
from tests.memory import resident_bytes

STEPS = 10_000
WARM_UP = 1_000
SAMPLE_EVERY = 500
# About 1.1 M elements (4.4 MiB as fp32) in 48 tensors of mixed sizes, layouts and dtypes; fp64 goes
# to the torch backend beside the native one.
SHAPES = [(32768,), (64, 3, 3, 3), (1031,), (7,), (), (129, 33), (4096,), (1,)] * 6
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
RECURRING_PATTERNS = 4
# What a leak of one small object per step would show after 9,000 steps: a plan (~10 KiB) per step
# is ~90 MiB, a gradient set per step is gigabytes; allocator noise is a few MiB.
RSS_GROWTH_LIMIT = 16 * 2**20
OBJECT_GROWTH_LIMIT = 500


def _model(gen):
    params = []
    for i, shape in enumerate(SHAPES):
        t = torch.randn(shape, generator=gen).to(DTYPES[i % len(DTYPES)])
        if t.dim() == 4 and i % 2:
            t = t.contiguous(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(t))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "torch"], indirect=True)
def test_memory_stays_flat_over_10000_steps_of_churning_participation(backend):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} is not available here")
    gen = torch.Generator().manual_seed(0)
    params = _model(gen)
    groups = [
        dict(params=params[0::2], rho=0.1, sigma=1.0, lmbda=0.6),
        dict(params=params[1::2], rho=0.05, adaptive=True, adaptive_eta=0.01, fisher_eta=0.1),
    ]
    opt = FriendlySAM(groups, torch.optim.SGD, lr=1e-4, momentum=0.9, backend=backend)
    # The gradients' values come from one fixed set; every step gets fresh copies, as from a backward.
    values = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    recurring = [torch.rand(len(params), generator=gen) < 0.5 for _ in range(RECURRING_PATTERNS)]
    rss, objects = [], []
    for step in range(STEPS):
        pattern = torch.rand((), generator=gen) < 0.3
        mask = (
            recurring[step % RECURRING_PATTERNS] if pattern else torch.rand(len(params), generator=gen) < 0.5
        )
        for half in (opt.first_step, opt.second_step):
            for p, v, take in zip(params, values, mask.tolist()):
                p.grad = torch.empty_like(p).copy_(v) if take else None
            half(zero_grad=True)
        assert len(opt._planner.cache) <= MAX_CACHED_PLANS
        if step >= WARM_UP and (step - WARM_UP) % SAMPLE_EVERY == 0:
            gc.collect()
            rss.append(resident_bytes())
            objects.append(len(gc.get_objects()))
    assert all(torch.isfinite(p).all() for p in params)
    # For the record (pytest -s): what the run held, sampled after the warm-up.
    print(f"\n{backend}: resident MiB {[round(r / 2**20, 1) for r in rss]}; live objects {objects}")
    grown = max(rss) - rss[0]
    assert grown < RSS_GROWTH_LIMIT, f"resident memory grew by {grown / 2**20:.1f} MiB: {rss}"
    assert max(objects) - objects[0] < OBJECT_GROWTH_LIMIT, f"live objects: {objects}"
