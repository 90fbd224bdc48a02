"""The Triton kernels on the CPU under TRITON_INTERPRET=1, against the reference loop.

The optimizer-level behaviour tests (semantics, non-finite steps, GradScaler, variants...)
run with triton too in that process, through the ``backend`` fixture of tests/conftest.py.

Triton decides whether to interpret a kernel when it is decorated, that is when the
kernels are imported, and other test modules import the backends earlier in a plain
``pytest tests/`` run. So this module runs only in a process started with the variable
set: ``tests/test_triton_interpreter_run.py`` starts one, or run it directly with
``TRITON_INTERPRET=1 python -m pytest tests/test_triton_interpreted.py``.

The interpreter runs every program in Python, so the large shared cases are replaced by
smaller ones with the same shape of problem, and runs take 3 steps (enough for the EMA).
"""

import dataclasses
import math
import zlib

import pytest
import torch

pytest.importorskip("triton")

from fsam_fused import FriendlySAM, backends  # noqa: E402
from tests.cases import CASES, assert_traces_close, attached_plans, run  # noqa: E402
from tests.op_oracle import (  # noqa: E402
    SHAPE_SETS,
    VARIANTS,
    check_shapes,
    check_zero_etas_are_bit_exact,
)
from tests.triton_ops import TritonOps  # noqa: E402

triton_backend = backends._load("triton")
if triton_backend is None or "cpu" not in triton_backend.device_types:
    pytest.skip(
        "runs in a process started with TRITON_INTERPRET=1 (tests/test_triton_interpreter_run.py)",
        allow_module_level=True,
    )

CHUNK = triton_backend.kernels.block_map.CHUNK
BLOCK = triton_backend.kernels.common.FIXED_CONFIG.block
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS = 3


def _interpreter_cases():
    edges = (BLOCK - 1, BLOCK, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + BLOCK + 7, 3)
    smaller = {
        "chunk_boundaries": lambda c: dataclasses.replace(
            c, shapes=tuple((n,) for n in edges), groups=(dict(), dict(adaptive=True, rho=0.05))
        ),
        "many_tiny": lambda c: dataclasses.replace(c, shapes=c.shapes[:40]),
        "few_large": lambda c: dataclasses.replace(c, shapes=((2 * CHUNK + 5,), (97, 301))),
        "sam": lambda c: dataclasses.replace(c, shapes=((50,), (7, 7), (CHUNK + 1,))),
    }
    return [smaller.get(c.name, lambda c: c)(c) for c in CASES]


CASES_HERE = _interpreter_cases()


def _seed(*parts) -> int:
    return zlib.crc32("triton".join(map(str, parts)).encode()) % 10_000


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES_HERE, ids=[c.name for c in CASES_HERE])
def test_triton_matches_reference_over_steps(case, dtype):
    seed = _seed(case.name, dtype)
    expected = run(case, "reference", dtype=dtype, seed=seed, steps=STEPS)
    actual = run(case, "triton", dtype=dtype, seed=seed, steps=STEPS)
    assert_traces_close(actual, expected, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape_set", SHAPE_SETS)
def test_kernels_match_the_op_oracle_on_aligned_and_unaligned_tensors(shape_set, variant):
    """Both branches of every kernel: 16-byte vectors and the scalar fallback (kernels/vector.py)."""
    check_shapes(TritonOps(), SHAPE_SETS[shape_set], DTYPES, "cpu", **VARIANTS[variant], label="tt")


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_etas_give_the_formula_from_before_the_etas_bit_for_bit(variant):
    """Without bf16 parameters: Triton 3.8's interpreter casts fp32 to bf16 by truncation (a
    compiled kernel rounds to nearest even, as torch does), so its bf16 results are one ulp
    off in about half the elements whatever the formula; tests/test_triton_gpu.py has bf16."""
    dtypes = [torch.float32, torch.float16]
    check_zero_etas_are_bit_exact(TritonOps(), "cpu", **VARIANTS[variant], label="tt", dtypes=dtypes)


def _mixed_params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes_and_types = [
        ((33,), torch.float32), ((CHUNK + 9,), torch.bfloat16), ((7, 5), torch.float16),
        ((), torch.bfloat16), ((129,), torch.float32), ((2, 3, 4), torch.float16), ((64,), torch.float64),
    ]  # fmt: skip
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(t)) for s, t in shapes_and_types]


def _run_mixed(backend, seed, steps=STEPS):
    params = _mixed_params(seed)
    groups = [dict(params=params[0::2]), dict(params=params[1::2], adaptive=True, sigma=0.5, rho=0.2)]
    opt = FriendlySAM(groups, torch.optim.SGD, rho=0.1, lmbda=0.6, lr=0.05, backend=backend)
    g = torch.Generator().manual_seed(seed + 1)
    perturbed = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.first_step(zero_grad=True)
        perturbed.append([p.detach().clone() for p in params])
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.second_step(zero_grad=True)
    return perturbed, [p.detach().clone() for p in params], [opt.state[p]["momentum"].clone() for p in params]


def test_one_plan_of_mixed_element_types_matches_reference():
    """fp32, bf16 and fp16 share a plan (one launch each); fp64 falls back to the torch backend."""
    seed = _seed("mixed")
    actual, expected = _run_mixed("triton", seed), _run_mixed("reference", seed)
    for a_list, e_list in zip(actual[0] + [actual[1], actual[2]], expected[0] + [expected[1], expected[2]]):
        for a, e in zip(a_list, e_list):
            tol = dict(rtol=2e-2, atol=2e-2) if a.dtype in (torch.bfloat16, torch.float16) else {}
            torch.testing.assert_close(a, e, **tol)


def test_table_follows_gradients_that_moved():
    """New gradient tensors at new addresses every step are read, not the old ones."""
    case = dataclasses.replace(CASES[0], name="moving", shapes=((50,), (CHUNK + 3,), (4, 4)))
    seed = _seed("moving")
    expected = run(case, "reference", seed=seed, steps=STEPS)
    keep_alive = []
    original = torch.Tensor.to

    def to_fresh_memory(t, *args, **kwargs):
        # Keeping every gradient alive forces each new one to a new address.
        out = original(t, *args, **kwargs).clone()
        keep_alive.append(out)
        return out

    torch.Tensor.to = to_fresh_memory
    try:
        actual = run(case, "triton", seed=seed, steps=STEPS)
    finally:
        torch.Tensor.to = original
    assert len({t.data_ptr() for t in keep_alive}) == len(keep_alive)
    assert_traces_close(actual, expected, torch.float32)


def test_after_a_graph_capture_every_eager_step_uploads_its_gradient_addresses(monkeypatch):
    """A replay rewrites the table with the recorded addresses; the host cannot see it."""
    plan_arrays = triton_backend.kernels.plan_arrays
    g = torch.Generator().manual_seed(_seed("graph"))
    params = [torch.randn(5, generator=g), torch.randn(CHUNK + 1, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    arrays = plan_arrays.PlanArrays(params, grads, None, [p.clone() for p in params])
    grad_row = arrays.table[plan_arrays.GRAD.value]
    eager = [t.data_ptr() for t in grads]
    recorded = [t.clone() for t in grads]

    monkeypatch.setattr(plan_arrays, "capturing", lambda device: True)
    arrays.use_grads([t.data_ptr() for t in recorded])  # the step recorded into the graph
    monkeypatch.setattr(plan_arrays, "capturing", lambda device: False)
    arrays.use_grads(eager)  # an eager step
    assert grad_row.tolist() == eager
    grad_row.copy_(torch.tensor([t.data_ptr() for t in recorded]))  # what a replay does
    arrays.use_grads(eager)  # the next eager step, at the same addresses
    assert grad_row.tolist() == eager


def test_the_gradient_row_reserves_a_buffer_for_a_first_upload_inside_a_capture(monkeypatch):
    """The row is written with the whole table at build time: without its own reserved buffer,
    a capture's first upload of it would allocate pinned memory during the capture."""
    plan_arrays = triton_backend.kernels.plan_arrays
    reserved = []
    monkeypatch.setattr(plan_arrays.Staging, "reserve", lambda staging, out: reserved.append((staging, out)))
    params = [torch.randn(5), torch.randn(CHUNK + 1)]
    arrays = plan_arrays.PlanArrays(
        params, [torch.randn(p.shape) for p in params], None, [p.clone() for p in params]
    )
    grad_staging = arrays._stagings[1]
    assert [(staging, out.shape) for staging, out in reserved] == [(grad_staging, (len(params),))]
    assert reserved[0][1].data_ptr() == arrays.table[plan_arrays.GRAD.value].data_ptr()


def _plan(seed, inv_scale=None):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((5,), (CHUNK + 1,), (3, 7))]
    opt = FriendlySAM(
        [dict(params=params[:2]), dict(params=params[2:], adaptive=True)], torch.optim.SGD, lr=0.1,
        backend="triton",
    )  # fmt: skip
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt._sync_state()
    opt.state[params[0]]["momentum"].copy_(torch.randn(5, generator=g))
    opt.state[params[0]]["momentum_seeded"].fill_(1.0)
    ((_, plan),) = attached_plans(opt)
    plan.inv_scale = inv_scale
    return plan


@pytest.mark.parametrize("inv_scale", [None, 0.125], ids=["no_scale", "inv_scale"])
def test_sq_norm_writes_every_partial_and_matches_torch_backend(inv_scale):
    seed = _seed("sq_norm", inv_scale)
    scale = None if inv_scale is None else torch.tensor(inv_scale)
    plan = _plan(seed, scale)
    expected = backends.resolve("torch", "cpu").sq_norm(_plan(seed, scale))
    triton_backend.sq_norm(plan)
    plan.cache["triton"].partials.fill_(math.nan)
    actual = triton_backend.sq_norm(plan)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    assert actual.dim() == 0 and actual.dtype == torch.float32


@pytest.mark.parametrize("total", [math.inf, math.nan], ids=["inf", "nan"])
def test_non_finite_total_leaves_params_and_momentum_bit_identical_and_writes_backup(total):
    plan = _plan(_seed("skip", total))
    for b in plan.backup:
        b.fill_(math.nan)
    before = [p.detach().clone() for p in plan.params]
    momentum = [m.clone() for m in plan.momentum]
    triton_backend.perturb_(plan, torch.tensor(total))
    for p, b, old in zip(plan.params, plan.backup, before):
        assert torch.equal(p, old) and torch.equal(b, old)
    for m, old in zip(plan.momentum, momentum):
        assert torch.equal(m, old)


def test_restore_is_bit_exact_for_every_element_type():
    g = torch.Generator().manual_seed(_seed("restore"))
    params = [torch.randn(n, generator=g).to(t) for n, t in ((CHUNK + 2, torch.float16), (9, torch.bfloat16))]
    params.append(torch.randn(BLOCK + 1, generator=g))
    backup = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    arrays = triton_backend.kernels.PlanArrays(params, params, None, backup)
    triton_backend.kernels.restore_(arrays)
    for p, b in zip(params, backup):
        assert torch.equal(p.view(torch.int16 if p.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32))  # fmt: skip


def test_two_runs_are_bitwise_equal():
    case = CASES[4]
    first, second = (run(case, "triton", seed=_seed("determinism"), steps=2) for _ in range(2))
    for a_step, b_step in zip(first.perturbed + first.updated, second.perturbed + second.updated):
        for a, b in zip(a_step, b_step):
            assert torch.equal(a, b)
