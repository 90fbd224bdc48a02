"""Training agreement: a small MLP on scikit-learn's handwritten digits, once per backend.

The digits set (1797 8x8 images) ships inside scikit-learn, so this needs no download.
Every backend trains from the same initial weights on the same batches with F-SAM and
SGD; their loss curves and final parameters must match ``reference``'s within the fp32
tolerances scaled for the number of steps (rounding differences of the norm compound).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fsam_fused import FriendlySAM
from fsam_fused import testing as tolerances

from .agreement import Verdict, compare

STEPS = 40
BATCH = 64


@dataclass
class TrainingRun:
    backend: str
    losses: list[float] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    test_accuracy: float = 0.0
    seconds: float = 0.0


def load_digits_tensors(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Train and test splits of the digits set as fp32 tensors scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64, device=device)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(device)
    x, y = x[order], y[order]
    split = len(y) * 4 // 5
    return x[:split], y[:split], x[split:], y[split:]


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10)).to(device)


def train(backend: str, device: torch.device, steps: int = STEPS) -> TrainingRun:
    """``steps`` F-SAM steps (authors' CIFAR hyperparameters) of the MLP with ``backend``."""
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_tensors(device)
    model = _model(device)
    opt = FriendlySAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        sigma=1.0,
        lmbda=0.6,
        backend=backend,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
    )
    batches = torch.Generator().manual_seed(1)
    run = TrainingRun(backend)
    for _ in range(steps):
        idx = torch.randint(len(y_train), (BATCH,), generator=batches).to(device)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.second_step(zero_grad=True)
        run.losses.append(loss.item())
    with torch.no_grad():
        run.test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    run.params = [p.detach().clone() for p in model.parameters()]
    run.seconds = time.perf_counter() - start
    return run


def check_agreement(
    backends: list[str], device: torch.device, progress: Callable[[str], None], steps: int = STEPS
) -> tuple[dict[str, TrainingRun], dict[str, Verdict]]:
    """Train with ``reference`` and each backend; the verdict of each against reference."""
    runs = {}
    verdicts = {}
    for backend in ["reference", *[b for b in backends if b != "reference"]]:
        progress(f"digits: training {steps} F-SAM steps with {backend}")
        try:
            runs[backend] = train(backend, device, steps)
        except Exception as exc:  # a crashing backend disagrees; report it, keep going
            verdicts[backend] = Verdict(False, f"{type(exc).__name__}: {exc}")
            continue
        if backend != "reference":
            ref, run = runs["reference"], runs[backend]
            verdict = compare(
                [torch.tensor(run.losses)], [torch.tensor(ref.losses)], "loss curve", **tolerances.TRAINING
            )
            if verdict:
                verdict = compare(run.params, ref.params, "final param", **tolerances.TRAINING)
            verdicts[backend] = verdict
    return runs, verdicts
