"""Compact definitions of the architectures whose parameter shapes the presets use.

torchvision and transformers are not dependencies, so each model is written here just
far enough to own the same parameters as the original (names, shapes, order); the
forward passes exist only where a benchmark trains the model (ResNet-18 for CIFAR).
Instantiate them on the ``meta`` device to read shapes without allocating memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """The ResNet basic block with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as in the F-SAM CIFAR runs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko and Komodakis 2016): BN-ReLU-conv, twice."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None if in_planes == planes else nn.Conv2d(in_planes, planes, 1, stride, bias=False)


class WideResNet(nn.Module):
    """WRN-depth-width for CIFAR; WRN-28-10 has 36.5 M parameters."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        assert (depth - 4) % 6 == 0, "WideResNet depth must be 6n + 4"
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        stages, in_planes = [], 16
        for planes, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range(blocks_per_stage):
                stages.append(WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, fused-QKV attention, LayerNorm, 4x MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim)
        self.attn_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp_fc = nn.Linear(dim, 4 * dim)
        self.mlp_proj = nn.Linear(4 * dim, dim)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021); the defaults are ViT-B/16 at 224 px, 86.6 M parameters."""

    def __init__(
        self, image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)


class GPT2(nn.Module):
    """GPT-2 (Radford et al. 2019); the defaults are GPT-2 small, 124.4 M parameters.

    The output projection is tied to the token embedding, so it owns no parameter.
    """

    def __init__(self, vocab: int = 50257, context: int = 1024, dim: int = 768, depth: int = 12) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.h = nn.Sequential(*(TransformerBlock(dim) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(dim)


class TinyTower(nn.Module):
    """A deep stack of tiny Linear + LayerNorm layers: thousands of tensors of a few dozen
    elements, where per-tensor overhead (launches, Python loops) dominates the step."""

    def __init__(self, width: int = 8, depth: int = 1000) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth))
        )
