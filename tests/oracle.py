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

A step is skipped (nothing changes) when that sum is not finite. The perturbed parameter is
``(p + e)`` rounded to the parameter's dtype; ``second_step`` puts ``p`` back exactly and
then applies :class:`PlainSGD`, which the tests also give the optimizer under test, so both
sides take the same base step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

GROUP_DEFAULTS = dict(rho=0.05, sigma=1.0, lmbda=0.9, adaptive=False, adaptive_eta=0.0, fisher_eta=0.0)


class PlainSGD(torch.optim.Optimizer):
    """``p <- p - lr * g``, computed in float64 and rounded once to ``p``'s dtype."""

    def __init__(self, params: Any, lr: float = 0.1, **kwargs: Any) -> None:
        super().__init__(params, dict(lr=lr, **kwargs))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(sgd_update(p, p.grad, group["lr"]))


def sgd_update(p: Tensor, g: Tensor, lr: float) -> Tensor:
    return (p.double() - lr * g.double()).to(p.dtype)


class Oracle:
    """F-SAM over its own copies of the parameters.

    Args:
        params: the initial parameters (copied).
        groups: for each parameter, the index of its group in ``hyper``.
        hyper: one dict of group values per group (missing keys take GROUP_DEFAULTS).
        lr: the PlainSGD learning rate.
        eps: added to the norm.
        with_momentum: False for SAM.
    """

    def __init__(
        self,
        params: list[Tensor],
        groups: list[int],
        hyper: list[dict[str, Any]],
        *,
        lr: float,
        eps: float = 1e-12,
        with_momentum: bool = True,
    ) -> None:
        self.params = [p.detach().clone() for p in params]
        self.groups = groups
        self.hyper = [{**GROUP_DEFAULTS, **h} for h in hyper]
        self.lr = lr
        self.eps = eps
        self.with_momentum = with_momentum
        self.momentum: list[Tensor | None] = [None] * len(params)
        self.skipped = 0
        self._backup: list[Tensor | None] = []

    def first_step(self, grads: list[Tensor | None]) -> None:
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
            t = (p.double().abs() + h["adaptive_eta"]) if h["adaptive"] else torch.ones_like(g)
            t = t / torch.sqrt(1 + h["fisher_eta"] * g * g)
            terms.append(((t * d) ** 2).sum())
            updates.append((t * t * d, new_m))
        total = float(sum(terms)) if terms else 0.0
        self._backup = [p.clone() for p in self.params]
        if not math.isfinite(total):
            self.skipped += 1
            self._backup = []
            return
        norm = math.sqrt(total)
        for i, update in enumerate(updates):
            if update is None:
                continue
            direction, new_m = update
            p = self.params[i]
            e = self.hyper[self.groups[i]]["rho"] * direction / (norm + self.eps)
            self.params[i] = (p.double() + e).to(p.dtype)
            if new_m is not None:
                self.momentum[i] = new_m

    def second_step(self, grads: list[Tensor | None]) -> None:
        if not self._backup:  # skipped
            return
        self.params = self._backup
        for i, g in enumerate(grads):
            if g is not None:
                self.params[i] = sgd_update(self.params[i], g, self.lr)

    def swap(self, i: int, fn) -> None:
        """What ``p.data = fn(p.data)`` does to parameter ``i``."""
        self.params[i] = fn(self.params[i])
