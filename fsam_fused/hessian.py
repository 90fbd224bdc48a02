"""The Hessian spectrum of a model's loss: top eigenvalues, trace and spectral density.

These are the sharpness measurements of the F-SAM paper's appendix A7 (``lambda_1`` and
``lambda_1 / lambda_5``) and the three quantities PyHessian made familiar, computed from
Hessian-vector products (double backward) without ever forming the Hessian:

- :func:`eigenvalues`: the ``k`` largest eigenvalues, by Lanczos with full reorthogonalisation;
- :func:`trace`: Hutchinson's estimator with Rademacher probes;
- :func:`density`: the eigenvalue density, by stochastic Lanczos quadrature.

Every function takes a model, a criterion and data the same way. ``data`` is an iterable of
``(inputs, targets)`` batches, each batch's loss is ``criterion(model(inputs), targets)``, and
the Hessian is that of the mean loss over all samples: batch ``b`` weighs ``len(targets_b)``
over the total, which is the mean over samples when the criterion averages over its batch.
The batches are read once and held for the whole computation, so every product uses the same
ones (a shuffling data loader would otherwise change the matrix between products); pass
``batches=`` to use only the first few. The derivatives are taken with respect to the
parameters that require grad, and the model runs in eval mode (BatchNorm uses its running
statistics); each module's mode is restored afterwards. Random vectors come from a private
``torch.Generator`` seeded with ``seed`` on the parameters' device, so a call is reproducible on
a given device and leaves the global RNG alone. The vectors have the parameters' dtype: for a
bf16 or fp16 model, measure a float32 (or float64) copy, ``copy.deepcopy(model).float()``.

Host syncs: the Lanczos loop keeps its coefficients on the device and decides restarts with
``torch.where``, so it reads nothing back until it ends; each function then copies its few
numbers (the tridiagonal matrix, or the probe values) to the host once, and the small
eigenproblem is solved there in float64. The model and criterion may sync on their own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Progress = Callable[[int, int], None]
"""Called after each Hessian-vector product with (products done, products planned)."""

Criterion = Callable[[Any, Any], Tensor]


def default_iterations(k: int) -> int:
    """Lanczos steps used by :func:`eigenvalues` when ``iterations`` is not given: on the
    problems of the HVP-count benchmark (``fsam_fused.bench.study.hvp_count``) the top 5 reached
    1e-3 relative within 13 to 32 steps, the most for a clustered top at initialisation."""
    return 2 * k + 40


@dataclass(frozen=True)
class Eigenvalues:
    """The result of :func:`eigenvalues`.

    Attributes:
        values: the ``k`` largest eigenvalues (Ritz values), largest first.
        residuals: for each value, ``||H y - value * y||`` of its Ritz vector ``y`` as the
            recurrence gives it (floored at rounding: the dtype's eps times the largest
            ``|value|``): some eigenvalue of the Hessian lies within this distance of the value,
            and the error of a well-separated one is of the order of ``residual**2 / gap``.
        products: Hessian-vector products used, each over all the batches.
    """

    values: list[float]
    residuals: list[float]
    products: int


@dataclass(frozen=True)
class TraceEstimate:
    """The result of :func:`trace`: the estimate, its Monte Carlo standard error (the
    probes' sample standard deviation over the square root of their number) and the count
    of Hessian-vector products used."""

    value: float
    standard_error: float
    products: int


@dataclass(frozen=True)
class SpectralDensity:
    """The result of :func:`density`: a quadrature rule per probe for the normalised
    eigenvalue distribution ``(1/n) sum_i delta(t - lambda_i)`` of the Hessian.

    Attributes:
        nodes: ``(probes, iterations)`` float64, the Ritz values of each probe's Lanczos run.
        weights: the same shape, the squared first components of the tridiagonal matrix's
            eigenvectors; each row sums to 1.
        products: Hessian-vector products used.
    """

    nodes: Tensor
    weights: Tensor
    products: int

    def evaluate(self, grid: Tensor, width: float) -> Tensor:
        """The density at the points of ``grid``, each node spread into a Gaussian of
        standard deviation ``width`` and the probes averaged (it integrates to 1)."""
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        grid = grid.to(torch.float64).reshape(-1, 1, 1)
        gauss = torch.exp(-0.5 * ((grid - self.nodes) / width) ** 2) / (width * math.sqrt(2 * math.pi))
        return (gauss * self.weights).sum(dim=2).mean(dim=1)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every module gets back its own mode (a plain
    ``model.train(previous)`` would flatten a model whose parts were in different modes)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value


class Hessian:
    """The Hessian of the mean loss over ``data``, as a linear operator on flat vectors.

    ``hessian @ v`` multiplies a vector of :attr:`size` elements (the parameters that require
    grad, flattened in ``model.parameters()`` order) by the Hessian, and counts the product
    in :attr:`products`. The module docstring says how data, modes and devices are handled.
    """

    def __init__(
        self, model: nn.Module, criterion: Criterion, data: Iterable[Any], *, batches: int | None = None
    ) -> None:
        if batches is not None:
            _check_positive_int("batches", batches)
        self.model = model
        self.criterion = criterion
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameters that require grad: there is no Hessian to measure")
        devices = {p.device for p in self.params}
        dtypes = {p.dtype for p in self.params}
        if len(devices) > 1 or len(dtypes) > 1:
            raise ValueError(
                "the parameters that require grad must share one device and one dtype, got "
                f"{sorted(map(str, devices))} and {sorted(map(str, dtypes))}; move the model with "
                "model.to(device, dtype) first"
            )
        self.device = devices.pop()
        self.dtype = dtypes.pop()
        if not self.dtype.is_floating_point:
            raise ValueError(f"the parameters must be floating point, got {self.dtype}")
        self.size = sum(p.numel() for p in self.params)
        self.batches = list(itertools.islice(data, batches))
        if not self.batches:
            raise ValueError("data yielded no batches; pass an iterable of (inputs, targets) pairs")
        sizes = [len(batch[1]) for batch in self.batches]
        self._weights = [s / sum(sizes) for s in sizes]
        self.products = 0

    def __matmul__(self, vector: Tensor) -> Tensor:
        if vector.shape != (self.size,):
            raise ValueError(f"vector must have shape ({self.size},), got {tuple(vector.shape)}")
        views = [
            chunk.view_as(p) for chunk, p in zip(vector.split([p.numel() for p in self.params]), self.params)
        ]
        result = torch.zeros_like(vector)
        with torch.enable_grad(), _eval_mode(self.model):
            for (inputs, targets), weight in zip(self.batches, self._weights):
                loss = self.criterion(
                    self.model(_to_device(inputs, self.device)), _to_device(targets, self.device)
                )
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                # A gradient that does not depend on the parameters has a zero Hessian block.
                terms = [(g * v).sum() for g, v in zip(grads, views) if g is not None and g.requires_grad]
                if not terms:
                    continue
                hvp = torch.autograd.grad(
                    torch.stack(terms).sum(), self.params, allow_unused=True, materialize_grads=True
                )
                result.add_(torch.cat([h.reshape(-1) for h in hvp]), alpha=weight)
        self.products += 1
        return result


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _generator(hessian: Hessian, seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device=hessian.device).manual_seed(seed)


def _gaussian(hessian: Hessian, generator: torch.Generator) -> Tensor:
    return torch.randn(hessian.size, generator=generator, device=hessian.device, dtype=hessian.dtype)


def _orthogonalise(vector: Tensor, basis: Tensor) -> Tensor:
    """``vector`` minus its projection on the orthonormal rows of ``basis``, done twice:
    one classical Gram-Schmidt pass leaves rounding-sized components behind, a second
    removes them ("twice is enough")."""
    for _ in range(2):
        vector = vector - basis.T @ (basis @ vector)
    return vector


def _reporter(progress: Progress | None, hessian: Hessian, planned: int) -> Callable[[], None]:
    """What to call after each product: ``progress(products so far, planned)``, or nothing."""
    if progress is None:
        return lambda: None
    return lambda: progress(hessian.products, planned)


def _lanczos(
    hessian: Hessian, start: Tensor, steps: int, generator: torch.Generator, report: Callable[[], None]
) -> tuple[Tensor, Tensor]:
    """``steps`` Lanczos iterations from ``start`` with full reorthogonalisation.

    Returns ``alpha`` (the tridiagonal matrix's diagonal) and ``beta`` (``beta[j]`` below
    ``alpha[j]``; the last one is the norm of the final residual), on the device. When the
    Krylov space is exhausted (an invariant subspace: the start vector has no component
    left along the remaining eigenvectors, as happens with repeated eigenvalues) the run
    continues from a fresh random vector orthogonal to the basis and that ``beta`` is 0: the
    matrix splits into blocks whose eigenvalues are all eigenvalues of the Hessian, so
    multiplicities are found. Decided with ``torch.where``: nothing is read back.
    """
    basis = torch.zeros(steps, hessian.size, device=hessian.device, dtype=hessian.dtype)
    alpha = torch.zeros(steps, device=hessian.device, dtype=hessian.dtype)
    beta = torch.zeros_like(alpha)
    # A residual this small relative to the matrix so far is rounding, not a direction;
    # dropping it moves the eigenvalues by at most that much (Weyl).
    exhausted_below = torch.finfo(hessian.dtype).eps ** 0.75
    scale = torch.zeros((), device=hessian.device, dtype=hessian.dtype)
    vector = start / start.norm()
    for j in range(steps):
        basis[j].copy_(vector)
        product = hessian @ vector
        alpha[j] = product @ vector
        residual = _orthogonalise(product, basis[: j + 1])
        norm = residual.norm()
        scale = torch.maximum(scale, alpha[j].abs())
        if j + 1 < steps:
            fresh = _orthogonalise(_gaussian(hessian, generator), basis[: j + 1])
            exhausted = norm <= exhausted_below * scale
            vector = torch.where(exhausted, fresh / fresh.norm(), residual / norm)
            norm = torch.where(exhausted, torch.zeros_like(norm), norm)
            scale = torch.maximum(scale, norm)
        beta[j] = norm
        report()
    return alpha, beta


def _tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the tridiagonal matrix, in float64 on the host."""
    alpha, beta = alpha.to("cpu", torch.float64), beta.to("cpu", torch.float64)
    off = beta[:-1]
    matrix = torch.diag(alpha) + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(matrix)


def eigenvalues(
    model: nn.Module,
    criterion: Criterion,
    data: Iterable[Any],
    k: int = 5,
    *,
    iterations: int | None = None,
    batches: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> Eigenvalues:
    """The ``k`` largest (algebraic) eigenvalues of the Hessian of the mean loss, largest first.

    Lanczos with full reorthogonalisation from a Gaussian start vector, ``iterations``
    Hessian-vector products in all (default :func:`default_iterations`: ``2k + 40``; at most
    the number of parameters, where the result is exact up to rounding). Extreme eigenvalues
    converge first; check ``residuals`` in the result, and raise ``iterations`` when they are
    too large for your purpose. Memory: ``iterations`` vectors of the parameters' size.
    ``progress`` is called after each product; see the module docstring for data, modes,
    seeding and host syncs.
    """
    _check_positive_int("k", k)
    hessian = Hessian(model, criterion, data, batches=batches)
    if k > hessian.size:
        raise ValueError(f"k={k} is more than the {hessian.size} parameters that require grad")
    if iterations is None:
        iterations = default_iterations(k)
    _check_positive_int("iterations", iterations)
    if iterations < k:
        raise ValueError(f"iterations must be at least k={k} to find k eigenvalues, got {iterations}")
    steps = min(iterations, hessian.size)
    generator = _generator(hessian, seed)
    report = _reporter(progress, hessian, steps)
    alpha, beta = _lanczos(hessian, _gaussian(hessian, generator), steps, generator, report)
    ritz, vectors = _tridiagonal_eigh(alpha, beta)
    top = torch.arange(steps - 1, steps - 1 - k, -1)
    rounding = torch.finfo(hessian.dtype).eps * ritz.abs().max()
    residuals = (beta[-1].to("cpu", torch.float64).abs() * vectors[-1, top].abs()).clamp(min=rounding)
    return Eigenvalues(ritz[top].tolist(), residuals.tolist(), hessian.products)


def trace(
    model: nn.Module,
    criterion: Criterion,
    data: Iterable[Any],
    *,
    probes: int = 100,
    batches: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> TraceEstimate:
    """The trace of the Hessian of the mean loss, by Hutchinson's estimator.

    The mean of ``v @ H @ v`` over ``probes`` Rademacher vectors ``v`` (entries +1 or -1
    with equal probability): unbiased, with variance ``2 * sum_{i != j} H_ij**2`` per probe
    (exact for a diagonal Hessian). One Hessian-vector product per probe; the values stay on
    the device until the end. See the module docstring for data, modes and seeding.
    """
    _check_positive_int("probes", probes)
    hessian = Hessian(model, criterion, data, batches=batches)
    generator = _generator(hessian, seed)
    report = _reporter(progress, hessian, probes)
    samples = torch.zeros(probes, device=hessian.device, dtype=hessian.dtype)
    for i in range(probes):
        signs = torch.randint(0, 2, (hessian.size,), generator=generator, device=hessian.device)
        probe = (2 * signs - 1).to(hessian.dtype)
        samples[i] = (hessian @ probe) @ probe
        report()
    samples = samples.to("cpu", torch.float64)
    error = samples.std().item() / math.sqrt(probes) if probes > 1 else math.inf
    return TraceEstimate(samples.mean().item(), error, hessian.products)


def density(
    model: nn.Module,
    criterion: Criterion,
    data: Iterable[Any],
    *,
    iterations: int = 80,
    probes: int = 1,
    batches: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> SpectralDensity:
    """The eigenvalue density of the Hessian, by stochastic Lanczos quadrature.

    For each of ``probes`` random unit vectors, ``iterations`` Lanczos steps (at most the
    number of parameters) give a Gauss quadrature rule whose nodes are Ritz values and whose
    weights sum to 1; averaged over probes they estimate the spectral distribution
    (Ghorbani, Krishnan, Xiao 2019; Lin, Saad, Yang 2016). ``probes * iterations``
    Hessian-vector products; smooth with :meth:`SpectralDensity.evaluate`.
    """
    _check_positive_int("iterations", iterations)
    _check_positive_int("probes", probes)
    hessian = Hessian(model, criterion, data, batches=batches)
    steps = min(iterations, hessian.size)
    generator = _generator(hessian, seed)
    report = _reporter(progress, hessian, probes * steps)
    nodes, weights = [], []
    for _ in range(probes):
        alpha, beta = _lanczos(hessian, _gaussian(hessian, generator), steps, generator, report)
        ritz, vectors = _tridiagonal_eigh(alpha, beta)
        nodes.append(ritz)
        weights.append(vectors[0] ** 2)
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), hessian.products)
