"""The study's data: scikit-learn's digits, with symmetric label noise on the training set."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..digits import load_digits_tensors

CLASSES = 10


@dataclass(frozen=True)
class Digits:
    """Training inputs with the labels trained on (``train_y``, noisy when ``noise > 0``) and
    the true ones (``clean_y``); a clean test split."""

    train_x: Tensor
    train_y: Tensor
    clean_y: Tensor
    test_x: Tensor
    test_y: Tensor


def symmetric_label_noise(labels: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """A copy of ``labels`` in which ``round(fraction * len)`` of them, chosen at random, are
    replaced by a different class drawn uniformly: exactly that fraction is wrong."""
    if not 0 <= fraction < 1:
        raise ValueError(f"label noise must be a fraction in [0, 1), got {fraction!r}")
    noisy = labels.clone()
    flipped = torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))]
    shift = torch.randint(1, CLASSES, (len(flipped),), generator=generator)
    noisy[flipped] = (labels[flipped] + shift) % CLASSES
    return noisy


@functools.cache
def _splits() -> tuple[Tensor, ...]:
    # Read once per process: every run of a study uses the same splits.
    return load_digits_tensors(torch.device("cpu"))


def load(noise: float, seed: int) -> Digits:
    """The digits splits (fixed), with the training labels of ``seed``'s noise draw."""
    train_x, train_y, test_x, test_y = _splits()
    noisy = symmetric_label_noise(train_y, noise, torch.Generator().manual_seed(seed))
    return Digits(train_x, noisy, train_y, test_x, test_y)
