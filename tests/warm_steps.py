"""Whole steps that bring an optimizer to its steady state: the first step checks its tensors and
keeps what it checked (plans, kept addresses); the later ones run on what was kept."""

from collections.abc import Callable

import torch

WARM_STEPS = 3


def warm_up(opt, set_grads: Callable[[], None], steps: int = WARM_STEPS) -> None:
    """``steps`` whole steps of ``opt``, ``set_grads()`` before each pass; then ``set_grads()`` once
    more, so the next step's first-pass gradients are in place."""
    for _ in range(steps):
        for half in (opt.first_step, opt.second_step):
            set_grads()
            half(zero_grad=True)
    set_grads()


def random_grads(params, gen) -> None:
    """A fresh standard-normal gradient for each of ``params``, drawn from ``gen``."""
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
