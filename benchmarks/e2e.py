"""End-to-end: a whole training step of ResNet-18 for CIFAR on synthetic 32x32 batches.

Variants: plain SGD (one forward/backward and the step), SAM with the reference loop
(sigma = 0), F-SAM with the reference loop, and F-SAM on each fast backend (two
forward/backward passes and the two half-steps each, BatchNorm statistics frozen in the
second pass as SAM users do). Each is reported as a ratio to SGD, and each F-SAM as a
ratio to SAM(reference): the authors' logs put their F-SAM at 1.27x their SAM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from fsam_fused import SAM, FriendlySAM, running_stats_frozen

from .architectures import ResNet18Cifar
from .measure import Budget, Summary, time_interleaved

SGD_KWARGS = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)  # the authors' CIFAR settings
SGD_VARIANT = "sgd"
SAM_REFERENCE = "sam_reference"
SAM_INTERVALS = (2, 5)


@dataclass
class E2EResult:
    variant: str
    time: Summary
    vs_sgd: float = 0.0
    vs_sam_reference: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "time_ms": self.time.as_dict(),
            "vs_sgd": self.vs_sgd,
            "vs_sam_reference": self.vs_sam_reference,
        }


def _sgd_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), **SGD_KWARGS)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sam_step(
    model: torch.nn.Module, opt: FriendlySAM, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with running_stats_frozen(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    return step


def _interval_steps(
    model: torch.nn.Module, opt: FriendlySAM, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """``opt.sam_interval`` iterations: a SAM step where due, a plain step otherwise."""
    sam_step = _sam_step(model, opt, x, y)

    def steps() -> None:
        for _ in range(opt.sam_interval):
            if opt.sam_due:
                sam_step()
            else:
                F.cross_entropy(model(x), y).backward()
                opt.plain_step(zero_grad=True)

    return steps


def run_e2e(
    fast_backends: list[str],
    device: torch.device,
    batch: int,
    budget: Budget,
    progress: Callable[[str], None],
    architecture: Callable[[], torch.nn.Module] = ResNet18Cifar,
) -> list[E2EResult]:
    """Time every variant, interleaved, each on its own copy of the same initial model
    (``architecture``: a module taking 3x32x32 images and giving 10 logits)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(10, (batch,), generator=gen).to(device)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return architecture().to(device)

    steps: dict[str, Callable[[], None]] = {SGD_VARIANT: _sgd_step(model(), x, y)}
    m = model()
    steps[SAM_REFERENCE] = _sam_step(
        m, SAM(m.parameters(), torch.optim.SGD, rho=0.1, backend="reference", **SGD_KWARGS), x, y
    )
    for backend in ["reference", *fast_backends]:
        m = model()
        opt = FriendlySAM(
            m.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.6, backend=backend, **SGD_KWARGS
        )
        steps[f"fsam_{backend}"] = _sam_step(m, opt, x, y)
    iterations = dict.fromkeys(steps, 1)
    for k in SAM_INTERVALS if fast_backends else ():
        m = model()
        opt = FriendlySAM(
            m.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.6, sam_interval=k,
            backend=fast_backends[0], **SGD_KWARGS,
        )  # fmt: skip
        name = f"fsam_{fast_backends[0]}_every{k}"
        steps[name], iterations[name] = _interval_steps(m, opt, x, y), k
    progress(f"e2e: timing {', '.join(steps)} (ResNet-18 CIFAR, batch {batch}) interleaved")
    timings = time_interleaved({name: [step] for name, step in steps.items()}, device, budget)
    sgd = timings[SGD_VARIANT][1].median
    sam = timings[SAM_REFERENCE][1].median
    results = []
    for name, (_, total) in timings.items():
        total = total.scaled(1 / iterations[name])
        result = E2EResult(name, total, vs_sgd=total.median / sgd)
        if name.startswith("fsam_"):
            result.vs_sam_reference = total.median / sam
        results.append(result)
    return results
