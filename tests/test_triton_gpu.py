"""The Triton backend compiled on a CUDA device: shared cases, native agreement, no host sync,
determinism, and a model of a few thousand tensors. Run by benchmarks/gpu_check.sh."""

import zlib

import pytest
import torch

import fsam_fused
from tests.cases import CASE_IDS, CASES, Case, assert_traces_close, run
from tests.op_oracle import SHAPE_SETS, VARIANTS, check_shapes, check_zero_etas_are_bit_exact
from tests.triton_ops import TritonOps

_triton = fsam_fused.backends._load("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        _triton is None or "cuda" not in _triton.device_types,
        reason="needs triton, compiling for CUDA (TRITON_INTERPRET unset)",
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _seed(*parts) -> int:
    return zlib.crc32("triton-gpu".join(map(str, parts)).encode()) % 10_000


def _native_on_cuda() -> bool:
    if "native" not in fsam_fused.available_backends():
        return False
    try:
        fsam_fused.backends.resolve("native", "cuda")
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_triton_matches_reference_over_steps(case, dtype):
    seed = _seed(case.name, dtype)
    expected = run(case, "reference", dtype=dtype, device="cuda", seed=seed)
    actual = run(case, "triton", dtype=dtype, device="cuda", seed=seed)
    assert_traces_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_triton_agrees_with_native(case, dtype):
    if not _native_on_cuda():
        pytest.skip("the native CUDA backend is not built")
    seed = _seed("native", case.name, dtype)
    expected = run(case, "native", dtype=dtype, device="cuda", seed=seed)
    actual = run(case, "triton", dtype=dtype, device="cuda", seed=seed)
    assert_traces_close(actual, expected, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtypes", [[d] for d in DTYPES] + [DTYPES], ids=["fp32", "bf16", "fp16", "mixed"])
@pytest.mark.parametrize("shape_set", SHAPE_SETS)
def test_kernels_match_the_op_oracle_on_aligned_and_unaligned_tensors(shape_set, dtypes, variant):
    check_shapes(TritonOps(), SHAPE_SETS[shape_set], dtypes, "cuda", **VARIANTS[variant], label="tt")


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_etas_give_the_formula_from_before_the_etas_bit_for_bit(variant):
    check_zero_etas_are_bit_exact(TritonOps(), "cuda", **VARIANTS[variant], label="tt")


def test_two_runs_are_bitwise_equal():
    case = Case(
        "determinism", ((1 << 20,), (3000, 70), (17,), (64, 3, 3, 3)), groups=(dict(), dict(adaptive=True))
    )
    first, second = (run(case, "triton", device="cuda", seed=_seed("det"), steps=3) for _ in range(2))
    for a_step, b_step in zip(first.perturbed + first.updated, second.perturbed + second.updated):
        for a, b in zip(a_step, b_step):
            assert torch.equal(a, b)


def _model_of_many_tensors(count: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5000, (count,), generator=g).tolist()
    sizes[::500] = [1 << 18] * len(sizes[::500])
    return [torch.nn.Parameter(torch.randn(n, generator=g).cuda()) for n in sizes]


def _steps(params, opt, steps, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, device="cuda")
        opt.first_step(zero_grad=True)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, device="cuda")
        opt.second_step(zero_grad=True)


def test_step_reads_nothing_back_to_the_host_after_warmup():
    """Warm-up steps build the plan and compile the kernels; later steps never sync, also
    when the gradients are new tensors every step (set_to_none)."""
    params = _model_of_many_tensors(300, _seed("sync"))
    opt = fsam_fused.FriendlySAM(params, torch.optim.SGD, lr=0.01, momentum=0.9, fused=True, backend="triton")
    _steps(params, opt, 2, seed=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(params, opt, 3, seed=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


def test_model_of_thousands_of_tensors_matches_torch_backend():
    count, seed = 3000, _seed("many")
    results = []
    for backend in ("torch", "triton"):
        params = _model_of_many_tensors(count, seed)
        groups = [dict(params=params[0::2]), dict(params=params[1::2], adaptive=True, rho=0.02)]
        opt = fsam_fused.FriendlySAM(groups, torch.optim.SGD, rho=0.1, lmbda=0.6, lr=0.01, backend=backend)
        _steps(params, opt, 3, seed=seed)
        results.append([p.detach().clone() for p in params] + [opt.state[p]["momentum"] for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
