"""An unchanged step of the native CPU backend allocates nothing whose size grows with the model.

Each step used to allocate per-tensor tables (the coefficient table, the seeded flags) and free
them again. Besides the allocator's own work, on the CPU a block of that size is where glibc's
malloc first consolidates every small block freed since (by the forward and backward passes, or
another optimizer): a millisecond after a pass that freed many tensors, charged to the step. The
plans now keep those tables and rewrite them in place. (What the C++ side allocates is not seen by
the profiler; NativeLists gathers no per-call list of tensors on its one-call and kept paths.)
"""

import pytest
import torch
from fsam_fused.bench.step_bench import NoBaseStep

from fsam_fused import FriendlySAM

pytest.importorskip("fsam_fused.backends.native", reason="the native extension is not built")

TENSORS = 2000  # a per-tensor fp32 table is 8 KB and up; the step's scalars are a few bytes


def _largest_allocation(step, **group) -> int:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(TENSORS)]
    opt = FriendlySAM(params, NoBaseStep, lr=0.1, rho=0.05, backend="native", **group)

    def one_step() -> None:
        for p in params:
            p.grad = torch.randn(5, generator=gen)
        step(opt)

    for _ in range(3):  # the first step plans and allocates the state; the later ones are unchanged
        one_step()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        one_step()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)  # (frees count negative)


def _sam_step(opt: FriendlySAM) -> None:
    opt.first_step()
    opt.second_step()


def _plain_step(opt: FriendlySAM) -> None:
    opt.plain_step()


@pytest.mark.parametrize("step", [_sam_step, _plain_step], ids=["sam step", "plain step"])
@pytest.mark.parametrize("group", [{}, {"adaptive": True}], ids=["fsam", "asam"])
def test_an_unchanged_step_allocates_nothing_that_grows_with_the_tensor_count(step, group):
    largest = _largest_allocation(step, **group)
    assert largest < 1024, f"an unchanged step allocated a block of {largest} bytes"
