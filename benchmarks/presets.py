"""Benchmark presets: parameter-shape lists read from architecture definitions.

Each preset builds its model on the ``meta`` device, so even GPT-2's 124 M parameters
cost no memory to enumerate, and the shape list can never drift from the architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from math import prod

import torch
from torch import nn

from . import architectures as arch


@dataclass(frozen=True)
class Preset:
    """A named model whose parameter shapes are benchmarked."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    on_gpu_check: bool = False  # part of benchmarks/gpu_check.sh's run


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("resnet18", "ResNet-18 for CIFAR-10", arch.ResNet18Cifar, on_gpu_check=True),
        Preset("wrn28_10", "WideResNet-28-10 for CIFAR-10", arch.WideResNet),
        Preset("vit_b16", "ViT-B/16, 224 px, 1000 classes", arch.VisionTransformer, on_gpu_check=True),
        Preset("gpt2", "GPT-2 small (tied output projection)", arch.GPT2),
        Preset("tiny", "1000 x (Linear 8x8 + LayerNorm 8): many tiny tensors", arch.TinyTower),
    )
}
DEFAULT_PRESET = "resnet18"


@cache
def parameter_shapes(name: str) -> tuple[tuple[int, ...], ...]:
    """The shapes of the preset's parameters, in the model's parameter order."""
    with torch.device("meta"):
        model = PRESETS[name].build()
    return tuple(tuple(p.shape) for p in model.parameters())


def numel(shapes: tuple[tuple[int, ...], ...]) -> int:
    """Total element count of a shape list."""
    return sum(prod(s) for s in shapes)


def subset_within(shapes: tuple[tuple[int, ...], ...], max_elements: int) -> tuple[tuple[int, ...], ...]:
    """The shapes, in order, that fit into ``max_elements`` when taken greedily.

    Keeps the correctness gate affordable on huge presets on the CPU while still
    covering the preset's own mix of shapes (a tensor bigger than the whole budget, such
    as GPT-2's token embedding, is skipped rather than ending the selection).
    """
    kept, left = [], max_elements
    for shape in shapes:
        if prod(shape) <= left:
            kept.append(shape)
            left -= prod(shape)
    return tuple(kept) or (min(shapes, key=prod),)


def resolve_presets(spec: str) -> list[str]:
    """Preset names from ``spec``: one name, a comma list, or ``all``.

    Raises ``ValueError`` naming the unknown preset and the choices.
    """
    if spec == "all":
        return list(PRESETS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names or [spec]:
        if name not in PRESETS:
            raise ValueError(f"--preset {name!r} is not a preset; choose from {', '.join(PRESETS)}, or all")
    return list(dict.fromkeys(names))
