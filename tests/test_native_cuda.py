"""The native backend on CUDA (run by benchmarks/gpu_check.sh on a GPU machine)."""

import zlib

import pytest
import torch

from fsam_fused import FriendlySAM
from tests.cases import CASE_IDS, CASES, assert_traces_close, run

_ops = pytest.importorskip("fsam_fused._ops", reason="the native extension is not built")
pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not _ops.has_cuda_kernels():
        pytest.fail("the extension was built without CUDA kernels; rebuild it where nvcc is present")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_native_matches_reference_on_cuda(case, dtype):
    seed = zlib.crc32(f"{case.name}{dtype}cuda".encode()) % 10_000
    expected = run(case, "reference", dtype=dtype, device="cuda", seed=seed)
    actual = run(case, "native", dtype=dtype, device="cuda", seed=seed)
    assert_traces_close(actual, expected, dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_two_runs_are_bitwise_identical(case):
    first = run(case, "native", device="cuda", seed=21)
    second = run(case, "native", device="cuda", seed=21)
    steps = zip(first.perturbed + first.updated, second.perturbed + second.updated, strict=True)
    for a_step, b_step in steps:
        for a, b in zip(a_step, b_step, strict=True):
            assert torch.equal(a, b)


def _model_params(n_tensors: int, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 600, (n_tensors,), generator=gen).tolist() + [1 << 20, 3 * 32768 + 7]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in sizes]


def test_steps_do_not_synchronize_with_the_host():
    params = _model_params(200, 1)
    opt = FriendlySAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, fused=True, backend="native")
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        checked = step > 0  # the first step builds (and uploads) the cached plan
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            opt.first_step()
            opt.second_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_model_of_thousands_of_tensors_matches_reference():
    params = _model_params(3000, 2)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [
        FriendlySAM(ps, torch.optim.SGD, lr=0.05, rho=0.1, lmbda=0.6, backend=backend)
        for ps, backend in ((params, "native"), (ref_params, "reference"))
    ]
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, device="cuda") for p in params]
        for ps, opt in zip((params, ref_params), opts, strict=True):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.first_step()
            opt.second_step()
    for a, e in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
