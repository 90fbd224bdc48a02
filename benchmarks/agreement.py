"""Train a small real model with every backend and check that they agree with reference."""

from __future__ import annotations

import torch
from torch import nn

from fsam_fused import FriendlySAM

# fp32: backends differ from the reference only in summation order.
RTOL, ATOL = 1e-4, 1e-5


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def train(backend: str, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    """F-SAM (the authors' CIFAR settings) on scikit-learn's digits; returns losses and parameters."""
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = FriendlySAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        sigma=1.0,
        lmbda=0.6,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
        backend=backend,
    )
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.second_step(zero_grad=True)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def check(backends: list[str], steps: int = 40, log=print) -> bool:
    """True when every backend's loss curve and final parameters match the reference run."""
    ref_losses, ref_params = train("reference", steps)
    log(f"digits, {steps} F-SAM steps: reference loss {ref_losses[0]:.4f} -> {ref_losses[-1]:.4f}")
    ok = True
    for backend in backends:
        losses, params = train(backend, steps)
        loss_gap = max(abs(a - b) for a, b in zip(losses, ref_losses))
        param_gap = max((p - q).abs().max().item() for p, q in zip(params, ref_params))
        agree = all(torch.allclose(p, q, rtol=RTOL, atol=ATOL) for p, q in zip(params, ref_params)) and (
            torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
        )
        ok &= agree
        log(
            f"  {backend:<8} loss {losses[-1]:.4f}  max |loss gap| {loss_gap:.2e}  "
            f"max |param gap| {param_gap:.2e}  {'agrees' if agree else 'DISAGREES'} "
            f"(rtol {RTOL}, atol {ATOL})"
        )
    return ok
