"""How many Hessian-vector products reach lambda_1..lambda_5 to 1e-3 relative: Lanczos
(:func:`fsam_fused.hessian.eigenvalues`) against power iteration with deflation, the method
PyHessian uses.

``python -m fsam_fused.bench.study.hvp_count --out DIR`` (``python -m benchmarks.study.hvp_count``
from a source checkout) writes ``hvp_count.json`` and ``hvp_count.md``. Every problem has an
exact spectrum: a quadratic built from a chosen one, or a small digits MLP whose Hessian is
formed in full (forward-over-reverse ``torch.func``, independent of the double backward that
the products use). The counts are deterministic.

Two ways to stop: the *oracle* stops each method the moment its estimates are within the
tolerance of the exact values, the best any stopping rule could do; *PyHessian's rule* stops
power iteration when an estimate changes by less than the tolerance, relative, between two
products (what users run; it may stop early, so its worst error is reported beside it).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F

from fsam_fused import hessian

from .data import load
from .train import make_model

TOLERANCE = 1e-3
K = 5
# Power iteration's cap per eigenvalue (PyHessian's default maxIter).
MAX_PRODUCTS_EACH = 100
Stop = Callable[[int, float, float | None], bool]


class Quadratic(nn.Module):
    """A model whose loss ``criterion(model(x), y)`` is ``0.5 w @ A @ w`` for a fixed symmetric
    ``A``: its Hessian is ``A`` whatever the weights."""

    def __init__(self, matrix: Tensor, generator: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.weights = nn.Parameter(
            torch.randn(len(matrix), generator=generator, dtype=matrix.dtype, device=matrix.device)
        )

    def forward(self, _inputs: Any) -> Tensor:
        return self.weights

    def criterion(self, weights: Tensor, _targets: Any) -> Tensor:
        return 0.5 * weights @ self.matrix @ weights

    @staticmethod
    def data() -> list[tuple[Tensor, Tensor]]:
        return [(torch.zeros(1), torch.zeros(1))]


def symmetric_with_spectrum(spectrum: Tensor, generator: torch.Generator) -> Tensor:
    """``Q diag(spectrum) Q^T`` for a random orthogonal ``Q``."""
    q, _ = torch.linalg.qr(
        torch.randn(len(spectrum), len(spectrum), generator=generator, dtype=spectrum.dtype)
    )
    return (q * spectrum) @ q.T


def exact_hessian(model: nn.Module, criterion: hessian.Criterion, inputs: Any, targets: Any) -> Tensor:
    """The full Hessian in the parameters that require grad (flattened in ``parameters()``
    order), column by column in chunks, by forward-over-reverse differentiation."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(vector: Tensor) -> Tensor:
        chunks = vector.split([p.numel() for _, p in named])
        params = {name: chunk.view_as(p) for (name, p), chunk in zip(named, chunks)}
        return criterion(functional_call(model, params, (inputs,)), targets)

    def column(direction: Tensor) -> Tensor:
        return jvp(grad(loss), (flat,), (direction,))[1]

    identity = torch.eye(len(flat), dtype=flat.dtype)
    return torch.cat([vmap(column)(block) for block in identity.split(256)])


def _within(values: Sequence[float], exact: Sequence[float], tolerance: float) -> bool:
    return all(abs(v - e) <= tolerance * abs(e) for v, e in zip(values, exact))


def oracle_stop(exact: Sequence[float], tolerance: float) -> Stop:
    return lambda i, estimate, _previous: abs(estimate - exact[i]) <= tolerance * abs(exact[i])


def relative_change_stop(tolerance: float) -> Stop:
    """PyHessian's rule: the estimate moved by less than ``tolerance`` relative to the last."""
    return lambda _i, estimate, previous: (
        previous is not None and abs(estimate - previous) / (abs(previous) + 1e-6) < tolerance
    )


def power_iteration(operator: hessian.Hessian, k: int, stop: Stop, seed: int = 0) -> list[float]:
    """The ``k`` eigenvalues of largest magnitude, one after another: power iteration on the
    Hessian restricted to the complement of the eigenvectors found so far (each iterate is
    orthogonalised against them), the estimate being the Rayleigh quotient. An eigenvalue
    stops at ``stop(i, estimate, previous estimate)`` or after ``MAX_PRODUCTS_EACH`` products."""
    generator = torch.Generator().manual_seed(seed)
    found: list[Tensor] = []
    values = []
    for i in range(k):
        vector = torch.randn(operator.size, generator=generator, dtype=operator.dtype)
        previous = None
        for _ in range(MAX_PRODUCTS_EACH):
            for u in found:
                vector = vector - (vector @ u) * u
            vector = vector / vector.norm()
            product = operator @ vector
            estimate = (product @ vector).item()
            if stop(i, estimate, previous):
                break
            previous, vector = estimate, product
        values.append(estimate)
        found.append(vector)
    return values


def lanczos_products_needed(
    model: nn.Module, criterion: hessian.Criterion, data: list, exact: Sequence[float], tolerance: float
) -> int:
    """The fewest products after which :func:`hessian.eigenvalues` has all ``len(exact)``
    values within ``tolerance``: a run of ``m`` steps is the first ``m`` steps of a longer
    one with the same seed, so this is where an oracle would stop it."""
    k = len(exact)
    for steps in range(k, sum(p.numel() for p in model.parameters() if p.requires_grad) + 1):
        if _within(hessian.eigenvalues(model, criterion, data, k, iterations=steps).values, exact, tolerance):
            return steps
    raise AssertionError("Lanczos with as many steps as parameters is exact; it cannot miss")


@dataclass
class Count:
    problem: str
    parameters: int
    exact: list[float]
    lanczos_oracle: int
    power_oracle: int
    power_pyhessian_rule: int
    power_pyhessian_rule_error: float
    lanczos_default_iterations: int
    lanczos_default_error: float

    @property
    def ratio(self) -> float:
        return self.lanczos_oracle / self.power_oracle


def _relative_error(values: Sequence[float], exact: Sequence[float]) -> float:
    return max(abs(v - e) / abs(e) for v, e in zip(values, exact))


def count(
    problem: str, model: nn.Module, criterion: hessian.Criterion, data: list, spectrum: Tensor
) -> Count:
    """Both methods on one problem whose full spectrum is ``spectrum``. Power iteration finds
    the largest magnitudes, so the top ``K`` must be the largest in magnitude too."""
    ordered = spectrum.sort(descending=True).values
    exact = ordered[:K].tolist()
    assert ordered[:K].abs().min() > ordered[K:].abs().max(), (
        f"{problem}: top-{K} are not the largest |lambda|"
    )
    operator = hessian.Hessian(model, criterion, data)
    power_iteration(operator, K, oracle_stop(exact, TOLERANCE))
    power_oracle = operator.products
    operator = hessian.Hessian(model, criterion, data)
    rule_values = power_iteration(operator, K, relative_change_stop(TOLERANCE))
    default = hessian.eigenvalues(model, criterion, data, K)
    return Count(
        problem=problem,
        parameters=operator.size,
        exact=exact,
        lanczos_oracle=lanczos_products_needed(model, criterion, data, exact, TOLERANCE),
        power_oracle=power_oracle,
        power_pyhessian_rule=operator.products,
        power_pyhessian_rule_error=_relative_error(rule_values, exact),
        lanczos_default_iterations=default.products,
        lanczos_default_error=_relative_error(default.values, exact),
    )


def quadratic_problem(size: int, seed: int = 0) -> tuple[Quadratic, Tensor]:
    """A quadratic whose spectrum decays like a trained network's top: ``1/i``, i = 1..size,
    with a small negative tail (the last tenth mirrored to ``-0.1/i``)."""
    generator = torch.Generator().manual_seed(seed)
    spectrum = 1.0 / torch.arange(1, size + 1, dtype=torch.float64)
    tail = size // 10
    spectrum[-tail:] = -0.1 * spectrum[-tail:]
    return Quadratic(symmetric_with_spectrum(spectrum, generator), generator), spectrum


def digits_problem(hidden: int, epochs: int, seed: int = 0) -> tuple[nn.Module, list, Tensor]:
    """The study's MLP with ``hidden`` units after ``epochs`` epochs of SGD (0: at
    initialisation), in float64, with its training loss over the whole training set."""
    digits = load(0.0, seed)
    model = make_model(hidden, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(digits.train_y), generator=order).split(64):
            F.cross_entropy(model(digits.train_x[idx]), digits.train_y[idx]).backward()
            optimizer.step()
            optimizer.zero_grad()
    model = model.double()
    inputs = digits.train_x.double()
    full = exact_hessian(model, F.cross_entropy, inputs, digits.train_y)
    return model, [(inputs, digits.train_y)], torch.linalg.eigvalsh(full)


def run_all(progress: Callable[[str], None]) -> list[Count]:
    counts = []
    for size in (200, 2000):
        progress(f"quadratic, 1/i spectrum, {size} parameters")
        model, spectrum = quadratic_problem(size)
        counts.append(count(f"quadratic 1/i, n={size}", model, model.criterion, model.data(), spectrum))
    for epochs in (0, 20):
        progress(f"digits MLP (32 hidden units) after {epochs} epochs of SGD")
        model, data, spectrum = digits_problem(32, epochs)
        stage = "at initialisation" if epochs == 0 else f"after {epochs} epochs of SGD"
        counts.append(count(f"digits MLP 64-32-10 {stage}", model, F.cross_entropy, data, spectrum))
    return counts


def markdown(counts: Sequence[Count]) -> str:
    lines = [
        f"Hessian-vector products to reach lambda_1..lambda_{K} within {TOLERANCE:g} relative "
        "(`python -m fsam_fused.bench.study.hvp_count`).",
        "",
        "| problem | parameters | Lanczos, oracle stop | power iteration, oracle stop | ratio | "
        f"power, PyHessian's rule (worst error) | Lanczos, default {hessian.default_iterations(K)} steps "
        "(worst error) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in counts:
        lines.append(
            f"| {c.problem} | {c.parameters} | {c.lanczos_oracle} | {c.power_oracle} | {c.ratio:.2f} | "
            f"{c.power_pyhessian_rule} ({c.power_pyhessian_rule_error:.1e}) | "
            f"{c.lanczos_default_iterations} ({c.lanczos_default_error:.1e}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvp_count", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("study-results"), help="folder for the JSON and markdown"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counts = run_all(lambda line: print(line, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hvp_count.json").write_text(
        json.dumps([asdict(c) | {"ratio": c.ratio} for c in counts], indent=1) + "\n"
    )
    table = markdown(counts)
    (args.out / "hvp_count.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
