"""Optimizer behaviour that needs CUDA: no host sync, model parallelism, CUDA agreement.

Marked ``gpu``: skipped without CUDA, run on a GPU machine by benchmarks/gpu_check.sh.
"""

import pytest
import torch

import fsam_fused
from fsam_fused import FriendlySAM
from tests.cases import CASE_IDS, CASES, assert_traces_close, run

pytestmark = pytest.mark.gpu

CUDA_BACKENDS = ["torch"] + [b for b in ("native", "triton") if b in fsam_fused.available_backends()]


def _fused_sgd_step(params, opt, first, second):
    for p, g in zip(params, first):
        p.grad = g
    opt.first_step(zero_grad=True)
    for p, g in zip(params, second):
        p.grad = g
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_backend_matches_reference(case, backend):
    for dtype in (torch.float32, torch.bfloat16):
        expected = run(case, "reference", dtype=dtype, device="cuda", seed=7)
        actual = run(case, backend, dtype=dtype, device="cuda", seed=7)
        assert_traces_close(actual, expected, dtype)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_step_with_fused_base_never_syncs_with_the_host(backend):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ((1000,), (64, 3, 3, 3), (7,))]
    opt = FriendlySAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, fused=True, backend=backend)
    grads = [[torch.randn_like(p) for p in params] for _ in range(8)]
    _fused_sgd_step(params, opt, grads[0], grads[1])  # builds state and plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):  # a per-step schedule uploads the group table every step
            group = opt.param_groups[0]
            group["rho"], group["sigma"], group["lmbda"] = 0.1 * i, 1.0 / i, 0.9 - 0.1 * i
            _fused_sgd_step(params, opt, grads[2 * i], grads[2 * i + 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_parameters_on_two_devices_share_one_global_norm(backend):
    torch.manual_seed(0)
    shapes = ((33,), (4, 5), (100,), (3,))
    devices = ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    values = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    split = [torch.nn.Parameter(v.to(d)) for v, d in zip(values, devices)]
    single = [torch.nn.Parameter(v.clone()) for v in values]
    opt_split = FriendlySAM(split, torch.optim.SGD, lr=0.0, rho=0.3, backend=backend)
    opt_single = FriendlySAM(single, torch.optim.SGD, lr=0.0, rho=0.3, backend="reference")
    for p, q, g in zip(split, single, grads):
        p.grad, q.grad = g.to(p.device), g.clone()
    opt_split.first_step()
    opt_single.first_step()
    for p, q in zip(split, single):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_captured_step_replays_like_eager_and_follows_schedules(backend):
    """A whole F-SAM step captured in a CUDA graph: same result as eager, rho and lr schedules apply."""

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).cuda()
        lr = torch.tensor(0.05, device="cuda")
        opt = FriendlySAM(
            model.parameters(), torch.optim.SGD, rho=0.1, lr=lr, momentum=0.9, fused=True, backend=backend
        )
        return model, opt

    x = torch.randn(16, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")

    def step(model, opt):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    graphed, graphed_opt = build()
    eager, eager_opt = build()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(graphed, graphed_opt)
            step(eager, eager_opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, graphed_opt)
    for i in range(6):
        for opt in (graphed_opt, eager_opt):
            opt.param_groups[0]["rho"] = 0.1 * (1 + i)
            opt.param_groups[0]["lr"].fill_(0.05 / (1 + i))
        graphed_opt.sync_hyperparameters()
        graph.replay()
        step(eager, eager_opt)
    torch.cuda.synchronize()
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
