"""Train one method on the digits with one seed, noise level and rho; measure its curves and,
at the end, the Hessian spectrum of its training loss."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fsam_fused import SAM, FriendlySAM, hessian

from .data import CLASSES, Digits, load
from .recipes import sam_db_step, sam_full_step, sam_step, sgd_step

METHODS = ("SGD", "SAM", "F-SAM", "SAM-db", "SAM-full")

# Each random stream of a run gets its own generator seed, so that, for instance, the noise
# draw and the batch order are not the same permutation.
_STREAMS = {"noise": 0, "init": 1, "order": 2, "other_batch": 3, "hessian": 4}


def stream_seed(seed: int, stream: str) -> int:
    return seed * len(_STREAMS) + _STREAMS[stream]


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study run depends on; the JSON output records it whole."""

    methods: tuple[str, ...] = METHODS
    noises: tuple[float, ...] = (0.0, 0.4)
    rhos: tuple[float, ...] = (0.1, 0.5)
    seeds: int = 5
    epochs: int = 100
    batch_size: int = 64
    hidden: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-3
    sigma: float = 1.0
    lmbda: float = 0.6
    top_k: int = 5
    trace_probes: int = 50
    density_iterations: int = 60


@dataclass
class Curves:
    """Metrics after each epoch (epoch 0: at initialisation), in eval mode. The training
    loss is over the whole training set with the labels trained on (noisy ones included)."""

    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)


def make_model(hidden: int, seed: int) -> nn.Module:
    """The study's MLP (64 pixels, one hidden ReLU layer, 10 classes), initialised from
    ``seed`` without touching the global RNG's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "init"))
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def make_optimizer(
    method: str, model: nn.Module, rho: float | None, config: StudyConfig
) -> torch.optim.Optimizer:
    base = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), **base)
    if method == "F-SAM":
        return FriendlySAM(
            model.parameters(), torch.optim.SGD, rho=rho, sigma=config.sigma, lmbda=config.lmbda, **base
        )
    if method in ("SAM", "SAM-db", "SAM-full"):
        return SAM(model.parameters(), torch.optim.SGD, rho=rho, **base)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@torch.no_grad()
def _evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(inputs)
    model.train()
    return F.cross_entropy(logits, targets).item(), (logits.argmax(1) == targets).float().mean().item()


def _record(curves: Curves, model: nn.Module, data: Digits) -> None:
    curves.train_loss.append(_evaluate(model, data.train_x, data.train_y)[0])
    curves.test_accuracy.append(_evaluate(model, data.test_x, data.test_y)[1])


def train(
    method: str, data: Digits, rho: float | None, seed: int, config: StudyConfig
) -> tuple[nn.Module, Curves]:
    """``config.epochs`` epochs of ``method``; every method of one seed starts from the same
    weights and sees the same batch order and learning-rate schedule (cosine, per step)."""
    model = make_model(config.hidden, seed)
    optimizer = make_optimizer(method, model, rho, config)
    samples = len(data.train_y)
    steps_per_epoch = math.ceil(samples / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(stream_seed(seed, "order"))
    other = torch.Generator().manual_seed(stream_seed(seed, "other_batch"))
    full_data = [(data.train_x, data.train_y)]
    curves = Curves()
    _record(curves, model, data)
    for _ in range(config.epochs):
        for idx in torch.randperm(samples, generator=order).split(config.batch_size):
            batch = (data.train_x[idx], data.train_y[idx])
            if method == "SGD":
                sgd_step(model, F.cross_entropy, optimizer, batch)
            elif method == "SAM-db":
                other_idx = torch.randperm(samples, generator=other)[: config.batch_size]
                sam_db_step(
                    model,
                    F.cross_entropy,
                    optimizer,
                    batch,
                    (data.train_x[other_idx], data.train_y[other_idx]),
                )
            elif method == "SAM-full":
                sam_full_step(model, F.cross_entropy, optimizer, batch, full_data)
            else:
                sam_step(model, F.cross_entropy, optimizer, batch)
            scheduler.step()
        _record(curves, model, data)
    return model, curves


def sharpness(model: nn.Module, data: Digits, seed: int, config: StudyConfig) -> dict[str, Any]:
    """The Hessian of the training loss (labels as trained) at ``model``'s weights, in float64:
    the top eigenvalues, the trace and the SLQ density."""
    probe = copy.deepcopy(model).double()
    batches = [(data.train_x.double(), data.train_y)]
    seed = stream_seed(seed, "hessian")
    top = hessian.eigenvalues(probe, F.cross_entropy, batches, k=config.top_k, seed=seed)
    trace = hessian.trace(probe, F.cross_entropy, batches, probes=config.trace_probes, seed=seed)
    density = hessian.density(
        probe, F.cross_entropy, batches, iterations=config.density_iterations, seed=seed
    )
    return {
        "eigenvalues": top.values,
        "residuals": top.residuals,
        "trace": trace.value,
        "trace_standard_error": trace.standard_error,
        "density_nodes": density.nodes[0].tolist(),
        "density_weights": density.weights[0].tolist(),
        "products": top.products + trace.products + density.products,
    }


def run(method: str, noise: float, rho: float | None, seed: int, config: StudyConfig) -> dict[str, Any]:
    """One run's record: its settings, curves, Hessian measurements and times."""
    start = time.perf_counter()
    data = load(noise, stream_seed(seed, "noise"))  # one noise draw per seed, for every method
    model, curves = train(method, data, rho, seed, config)
    trained = time.perf_counter()
    measured = sharpness(model, data, seed, config)
    return {
        "method": method,
        "noise": noise,
        "rho": rho,
        "seed": seed,
        "curves": vars(curves),
        # On the labels as trained: with label noise, how much of the noise was memorised.
        "final_train_accuracy": _evaluate(model, data.train_x, data.train_y)[1],
        "sharpness": measured,
        "train_seconds": trained - start,
        "hessian_seconds": time.perf_counter() - trained,
    }
