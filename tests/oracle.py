"""An independent F-SAM oracle in float64, written from DESIGN.md section 1 for the tests.

It shares nothing with the package: its own per-parameter state (``momentum`` present once
seeded, as in the authors' optimizer), no plans, no flat buffers, no backends. Tests run it
beside an optimizer, applying the same gradients and the same events (storage swaps, dtype
changes, schedules), and compare parameters and momentum.

The update of one step, per parameter ``p`` with gradient ``g`` and group values
``rho, sigma, lmbda, adaptive, adaptive_eta, fisher_eta``::

    d = g - sigma * m   (d = g and m = g on the parameter's first step)
    m <- lmbda * m + (1 - lmbda) * g
    T = (|p| + adaptive_eta if adaptive else 1) / sqrt(1 + fisher_eta * g^2)
    e = rho * T^2 d / (sqrt(sum over every tensor of ||T d||^2) + eps)

A step is skipped (nothing changes) when that sum is not finite or overflows float32 (the
README's rule: the kernels sum in fp32). The perturbed parameter is ``(p + e)`` rounded to the
parameter's dtype; ``second_step`` puts ``p`` back exactly and then takes the base step: by
default :class:`PlainSGD`'s, which the tests also give the optimizer under test, so both sides
take the same base step; or any other base update the test supplies (``base_step``). With a
GradScaler a non-finite second-pass gradient skips the whole step as well (``second_step(...,
skip_if_non_finite=True)``), and a plain step (``sam_interval``) is a step with ``e = 0`` whose
base update takes the same gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

GROUP_DEFAULTS = dict(rho=0.05, sigma=1.0, lmbda=0.9, adaptive=False, adaptive_eta=0.0, fisher_eta=0.0)
FLOAT32_MAX = torch.finfo(torch.float32).max

# The base update of the restored parameters: (parameters, second-pass gradients) -> parameters.
BaseStep = Callable[[list[Tensor], list["Tensor | None"]], list[Tensor]]


class PlainSGD(torch.optim.Optimizer):
    """``p <- p - lr * b`` with ``b = g`` (``momentum`` 0) or the heavy-ball buffer
    ``b <- momentum * b + g`` (``b = g`` at a parameter's first step), computed in float64 and
    rounded once to ``p``'s dtype. The buffer, fp64, is ``state[p]["momentum_buffer"]``; with
    ``momentum`` 0 the optimizer keeps no state."""

    def __init__(self, params: Any, lr: float = 0.1, momentum: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, **kwargs))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                entry = self.state.get(p, {})
                new_p, buffer = sgd_update(
                    p, p.grad, group["lr"], group["momentum"], entry.get("momentum_buffer")
                )
                p.copy_(new_p)
                if buffer is not None:
                    self.state[p]["momentum_buffer"] = buffer


def sgd_update(
    p: Tensor, g: Tensor, lr: float, momentum: float = 0.0, buffer: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """PlainSGD's update of one parameter: the new parameter and the new buffer (None without momentum)."""
    step = g.double()
    if momentum:
        step = step.clone() if buffer is None else momentum * buffer + step
    return (p.double() - lr * step).to(p.dtype), (step if momentum else None)


class PlainSGDStep:
    """:class:`PlainSGD`'s update over the oracle's parameter list, with its own buffers."""

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        self.lr, self.momentum = lr, momentum
        self.buffers: dict[int, Tensor] = {}

    def __call__(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        updated = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                updated.append(p)
                continue
            new_p, buffer = sgd_update(p, g, self.lr, self.momentum, self.buffers.get(i))
            if buffer is not None:
                self.buffers[i] = buffer
            updated.append(new_p)
        return updated


class Oracle:
    """F-SAM over its own copies of the parameters.

    Args:
        params: the initial parameters (copied).
        groups: for each parameter, the index of its group in ``hyper``.
        hyper: one dict of group values per group (missing keys take GROUP_DEFAULTS).
        lr: the PlainSGD learning rate.
        base_momentum: the PlainSGD momentum.
        base_step: the base update to take instead of PlainSGD's (then ``lr`` and
            ``base_momentum`` are unused).
        eps: added to the norm.
        with_momentum: False for SAM.
    """

    def __init__(
        self,
        params: list[Tensor],
        groups: list[int],
        hyper: list[dict[str, Any]],
        *,
        lr: float = 0.1,
        base_momentum: float = 0.0,
        base_step: BaseStep | None = None,
        eps: float = 1e-12,
        with_momentum: bool = True,
    ) -> None:
        self.params = [p.detach().clone() for p in params]
        self.groups = groups
        self.hyper = [{**GROUP_DEFAULTS, **h} for h in hyper]
        self.base_step = base_step if base_step is not None else PlainSGDStep(lr, base_momentum)
        self.eps = eps
        self.with_momentum = with_momentum
        self.momentum: list[Tensor | None] = [None] * len(params)
        self.skipped = 0
        self._backup: list[Tensor] = []
        self._momentum_before: list[Tensor | None] = []
        self.step_skipped = False

    def first_step(self, grads: list[Tensor | None], *, plain: bool = False) -> None:
        """Perturb (``e = 0`` when ``plain``) and update the momentum; nothing if the norm is not finite."""
        terms, updates = [], []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                updates.append(None)
                continue
            h = self.hyper[self.groups[i]]
            g = g.double()
            m = self.momentum[i]
            if not self.with_momentum:
                d, new_m = g, None
            elif m is None:
                d, new_m = g, g.clone()
            else:
                d = g - h["sigma"] * m
                new_m = h["lmbda"] * m + (1 - h["lmbda"]) * g
            a = (p.double().abs() + h["adaptive_eta"]) if h["adaptive"] else torch.ones_like(g)
            # A squared direction beyond fp32 makes the step non-finite in every variant (the
            # kernels form (a d)^2 before dividing by Fisher's f): the sum of terms below is not
            # enough, since f may be as large.
            squares = (a * d) ** 2
            terms.append(
                squares.max() if squares.numel() and squares.max() >= FLOAT32_MAX else torch.zeros(())
            )
            t = a / torch.sqrt(1 + h["fisher_eta"] * g * g)
            terms.append(((t * d) ** 2).sum())
            updates.append((t * t * d, new_m))
        total = float(sum(terms)) if terms else 0.0
        self._backup = [p.clone() for p in self.params]
        self._momentum_before = list(self.momentum)
        self.step_skipped = not total < FLOAT32_MAX  # NaN, Inf, or an fp32 overflow
        if self.step_skipped:
            self.skipped += 1
            return
        norm = math.sqrt(total)
        for i, update in enumerate(updates):
            if update is None:
                continue
            direction, new_m = update
            p = self.params[i]
            if not plain:
                e = self.hyper[self.groups[i]]["rho"] * direction / (norm + self.eps)
                self.params[i] = (p.double() + e).to(p.dtype)
            if new_m is not None:
                self.momentum[i] = new_m

    def second_step(self, grads: list[Tensor | None], *, skip_if_non_finite: bool = False) -> None:
        """Restore, then the base step; with ``skip_if_non_finite`` (a GradScaler), a non-finite
        gradient here skips the whole step, the momentum update included."""
        if self.step_skipped:
            return
        self.params = self._backup
        if skip_if_non_finite and not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            self.momentum = self._momentum_before
            self.skipped += 1
            return
        self.params = self.base_step(self.params, grads)

    def plain_step(self, grads: list[Tensor | None], *, skip_if_non_finite: bool = False) -> None:
        """A step without perturbation (``sam_interval``): the EMA and the base step on ``grads``."""
        self.first_step(grads, plain=True)
        self.second_step(grads, skip_if_non_finite=skip_if_non_finite)

    def swap(self, i: int, fn) -> None:
        """What ``p.data = fn(p.data)`` does to parameter ``i``."""
        self.params[i] = fn(self.params[i])
