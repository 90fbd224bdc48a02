"""A plan's coefficient table and seeded flags (fsam_fused/step_flags.py): the CPU loops of the
extension give the bits of the tensor ops they stand in for, decline where the ops must run (a
dispatch mode, a tensor they cannot read as plain memory), and leave an unchanged CPU step with no
tensor op to dispatch."""

from __future__ import annotations

import pytest
import torch
from fsam_fused.bench.step_bench import NoBaseStep
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fsam_fused import FriendlySAM, step_flags
from fsam_fused.hparams import COEF_COLUMNS, LMBDA, RHO

pytest.importorskip("fsam_fused.backends.native", reason="the native extension is not built")

SPECIALS = [0.0, 1.0, 0.5, -0.0, float("nan"), float("inf")]


@pytest.fixture
def ops_only(monkeypatch):
    """Run step_flags' tensor ops, as on a GPU (the reference for the loops)."""

    def use_ops() -> None:
        monkeypatch.setattr(step_flags, "_extension", None)

    return use_ops


def _inputs(seed: int, n: int, groups: int, flags: int):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(groups, COEF_COLUMNS, generator=gen)
    group_of = torch.randint(0, groups, (n,), generator=gen)
    slots = torch.randperm(flags, generator=gen)[:n]
    pick = torch.randint(0, len(SPECIALS), (flags,), generator=gen)
    seeded = torch.tensor(SPECIALS)[pick]
    return table, group_of, seeded, slots


def _gather(table, group_of, seeded, slots, plain: bool) -> torch.Tensor:
    n = group_of.numel()
    coef = torch.full((n, COEF_COLUMNS), 7.0)
    step_flags.gather_coef(coef, table, group_of, seeded, slots, torch.empty(n), plain=plain)
    return coef


def _expected_coef(table, group_of, seeded, slots, plain: bool) -> torch.Tensor:
    """The table's rows, row by row, as plan.py's docstring defines them."""
    rows = []
    for g, s in zip(group_of.tolist(), slots.tolist(), strict=True):
        row = table[g].clone()
        row[LMBDA] = row[LMBDA] * seeded[s]
        if plain:
            row[RHO] = 0.0
        rows.append(row)
    return torch.stack(rows) if rows else torch.empty(0, COEF_COLUMNS)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 300),
    groups=st.integers(1, 5),
    extra_flags=st.integers(0, 50),
    plain=st.booleans(),
)
def test_gather_coef_loops_match_the_ops(seed, n, groups, extra_flags, plain):
    table, group_of, seeded, slots = _inputs(seed, n, groups, n + extra_flags)
    loops = _gather(table, group_of, seeded, slots, plain)
    saved = step_flags._extension
    try:
        step_flags._extension = None
        ops = _gather(table, group_of, seeded, slots, plain)
    finally:
        step_flags._extension = saved
    assert _same_bits(loops, ops)
    assert _same_bits(loops, _expected_coef(table, group_of, seeded, slots, plain))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 300),
    extra_flags=st.integers(0, 50),
    ok=st.sampled_from(SPECIALS[:2]),
)
def test_mark_seeded_loops_match_the_ops(seed, n, extra_flags, ok):
    _, _, seeded, slots = _inputs(seed, n, 1, n + extra_flags)
    step_ok = torch.tensor(ok)
    loops, ops = seeded.clone(), seeded.clone()
    step_flags.mark_seeded(loops, slots, step_ok, torch.empty(n))
    saved = step_flags._extension
    try:
        step_flags._extension = None
        step_flags.mark_seeded(ops, slots, step_ok, torch.empty(n))
    finally:
        step_flags._extension = saved
    # Values, not bits: torch's own vector and scalar loops differ on the sign of max(-0.0, 0.0)
    # and on a NaN's payload (flags only an edit could write; the step writes 0 and 1).
    torch.testing.assert_close(loops, ops, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("total", [0.0, 3.5, float("inf"), float("-inf"), float("nan")])
def test_finite_flags_loops_match_the_ops(total, ops_only):
    loops = step_flags.finite_flags(torch.tensor(total))
    ops_only()
    ops = step_flags.finite_flags(torch.tensor(total))
    for a, b in zip(loops, ops, strict=True):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == ()
        assert _same_bits(a, b)


@pytest.mark.parametrize("flags", [[0.0, 1.0, 1.0, 0.0], [float("nan"), 1.0]])
def test_count_skipped_loops_match_the_ops(flags, ops_only):
    loops = torch.zeros(())
    for f in flags:
        step_flags.count_skipped(loops, torch.tensor(f))
    ops_only()
    ops = torch.zeros(())
    for f in flags:
        step_flags.count_skipped(ops, torch.tensor(f))
    torch.testing.assert_close(loops, ops, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(loops, torch.tensor(sum(flags)), rtol=0, atol=0, equal_nan=True)


def test_loops_bump_the_version_of_what_they_write():
    table, group_of, seeded, slots = _inputs(0, 10, 2, 12)
    coef = torch.empty(10, COEF_COLUMNS)
    before = coef._version, seeded._version
    step_flags.gather_coef(coef, table, group_of, seeded, slots, torch.empty(10), plain=False)
    step_flags.mark_seeded(seeded, slots, torch.tensor(1.0), torch.empty(10))
    assert (coef._version, seeded._version) == (before[0] + 1, before[1] + 1)
    counter = torch.zeros(())
    step_flags.count_skipped(counter, torch.tensor(1.0))
    assert counter._version == 1


def test_an_index_out_of_range_raises_before_anything_is_written():
    table, group_of, seeded, slots = _inputs(0, 10, 2, 12)
    bad = slots.clone()
    bad[-1] = 12
    kept = seeded.clone()
    with pytest.raises(RuntimeError, match="mark_seeded: index 12 out of range"):
        step_flags.mark_seeded(seeded, bad, torch.tensor(1.0), torch.empty(10))
    assert _same_bits(seeded, kept)
    bad_group = group_of.clone()
    bad_group[3] = -1
    with pytest.raises(RuntimeError, match="gather_coef: index -1 out of range"):
        _gather(table, bad_group, seeded, slots, plain=False)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_under_a_dispatch_mode_the_ops_run():
    table, group_of, seeded, slots = _inputs(0, 10, 2, 12)
    expected = _gather(table, group_of, seeded, slots, plain=True)
    coef, selected, total, step_ok = (
        torch.empty(10, COEF_COLUMNS),
        torch.empty(10),
        torch.tensor(1.0),
        torch.tensor(1.0),
    )
    calls = {
        "gather_coef": lambda: step_flags.gather_coef(
            coef, table, group_of, seeded, slots, selected, plain=True
        ),
        "finite_flags": lambda: step_flags.finite_flags(total),
        "mark_seeded": lambda: step_flags.mark_seeded(seeded, slots, step_ok, selected),
        "count_skipped": lambda: step_flags.count_skipped(counter, step_ok),
    }
    counter = torch.zeros(())
    expected_seeded = torch.maximum(seeded, step_ok)
    results = {}
    for name, call in calls.items():
        with _Recorder() as mode:
            results[name] = call()
        assert mode.ops, f"{name} dispatched nothing under a dispatch mode"
    assert _same_bits(coef, expected)
    assert [float(f) for f in results["finite_flags"]] == [1.0, 0.0]
    assert _same_bits(seeded, expected_seeded)
    assert float(counter) == 1.0


def test_under_a_torch_function_mode_the_ops_run():
    table, group_of, seeded, slots = _inputs(0, 10, 2, 12)
    seen = []

    class Logging(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    coef, selected, step_ok = torch.empty(10, COEF_COLUMNS), torch.empty(10), torch.tensor(1.0)
    with Logging():
        step_flags.gather_coef(coef, table, group_of, seeded, slots, selected, plain=False)
    assert torch.index_select in seen
    assert _same_bits(coef, _expected_coef(table, group_of, seeded, slots, plain=False))
    seen.clear()
    with Logging():
        step_flags.mark_seeded(seeded, slots, step_ok, selected)
    assert torch.maximum in seen


def test_tensors_the_loops_cannot_read_as_plain_memory_go_to_the_ops():
    table, group_of, seeded, slots = _inputs(0, 10, 2, 12)
    expected = _gather(table, group_of, seeded, slots, plain=False)
    strided_table = torch.empty(2, 2 * COEF_COLUMNS)[:, ::2]
    strided_table.copy_(table)
    assert _same_bits(_gather(strided_table, group_of, seeded, slots, plain=False), expected)
    # A view with a pending negation: it reads as the flags, its memory holds their negatives.
    negated = (-seeded)._neg_view()
    assert negated.is_neg()
    step_flags.mark_seeded(negated, slots, torch.tensor(1.0), torch.empty(10))
    marked = seeded.clone()
    marked[slots] = torch.maximum(seeded[slots], torch.tensor(1.0))
    torch.testing.assert_close(negated.resolve_neg(), marked, rtol=0, atol=0, equal_nan=True)
    # Wrappers over other tensors: functionalization, vmap.
    functional = torch.func.functionalize(lambda s: _gather(table, group_of, s, slots, plain=False))
    assert _same_bits(functional(seeded), expected)
    batched = torch.vmap(lambda t: step_flags.finite_flags(t)[1])(torch.tensor([1.0, float("inf")]))
    assert batched.tolist() == [0.0, 1.0]
    # Flags of another dtype: read as fp32 memory they would be garbage; the ops refuse them.
    double_seeded = seeded.double()
    coef = torch.empty(10, COEF_COLUMNS)
    with pytest.raises(RuntimeError):
        step_flags.gather_coef(coef, table, group_of, double_seeded, slots, torch.empty(10), plain=False)


def test_an_unchanged_cpu_first_step_dispatches_no_tensor_op():
    """The common CPU step (one native plan, nothing changed) runs its first pass in one call to
    the extension: no tensor op is dispatched between the scan and the seeded flags."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(20)]
    opt = FriendlySAM(params, NoBaseStep, rho=0.05, backend="native")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(5, generator=gen)
        opt.first_step()
        opt.second_step()
    for p in params:
        p.grad = torch.randn(5, generator=gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.first_step()
    dispatched = [e.name for e in prof.events() if e.name.startswith("aten::")]
    assert dispatched == [], dispatched
    opt.second_step()
