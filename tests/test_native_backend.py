"""The native backend inside the optimizer, on the CPU: selection and dtype fallback."""

import pytest
import torch

from fsam_fused import FriendlySAM
from fsam_fused.backends import resolve
from tests.cases import Case, assert_traces_close, run

pytest.importorskip("fsam_fused._ops", reason="the native extension is not built")


def test_auto_picks_native_on_cpu():
    assert resolve("auto", "cpu").name == "native"


def test_optimizer_steps_run_the_native_plan():
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = FriendlySAM(params, torch.optim.SGD, lr=0.1, backend="native")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    assert [backend.name for backend, _ in opt._pending.plans] == ["native"]
    opt.second_step()


def test_float64_params_fall_back_to_torch_and_match_reference():
    case = Case("mixed_fp64", ((33,), (4, 9), (65537,)))
    expected = run(case, "reference", dtype=torch.float64, seed=4)
    actual = run(case, "native", dtype=torch.float64, seed=4)
    assert_traces_close(actual, expected, torch.float64)


def test_mixed_dtypes_in_one_plan_match_reference():
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    params = [
        torch.nn.Parameter(torch.randn(40, dtype=dtype, generator=torch.Generator().manual_seed(i)))
        for i, dtype in enumerate(dtypes)
    ]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [
        FriendlySAM(ps, torch.optim.SGD, lr=0.1, rho=0.2, backend=backend)
        for ps, backend in ((params, "native"), (ref_params, "reference"))
    ]
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        grads = [torch.randn(40, generator=gen) for _ in params]
        for ps, opt in zip((params, ref_params), opts, strict=True):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.to(p.dtype)
            opt.first_step()
            opt.second_step()
    for a, e in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2)
