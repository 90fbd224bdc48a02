"""F-SAM with gradient accumulation: a batch of 128 taken as 4 micro-batches of 32.

    python examples/accumulation.py
    python examples/accumulation.py --micro-batches 8

A small classifier with BatchNorm on a synthetic task (labels from a fixed random linear
map). ``accumulated_step`` runs one SAM step over the micro-batches: the first pass over
all of them at w, ``first_step`` once, the second pass over the same ones at w + e,
``second_step`` once. Under DDP, pass the DDP model and ``mode="per_worker"`` or
``"sync"`` (see ``fsam_fused.distributed.first_pass``): only the last micro-batch of a pass
all-reduces.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsam_fused import FriendlySAM, accumulated_step

FEATURES, CLASSES, SAMPLES, BATCH = 16, 4, 1024, 128


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per batch of 128")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(SAMPLES, FEATURES, generator=g)
    y_all = (x_all @ torch.randn(FEATURES, CLASSES, generator=g)).argmax(dim=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, CLASSES))
    optimizer = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, lmbda=0.6, lr=0.1, momentum=0.9)
    steps = args.epochs * SAMPLES // BATCH
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    def loss_of(micro_batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = micro_batch
        return F.cross_entropy(model(x), y)

    k = args.micro_batches
    for epoch in range(args.epochs):
        order = torch.randperm(SAMPLES, generator=g)
        for batch in order.split(BATCH):
            micro_batches = list(zip(x_all[batch].chunk(k), y_all[batch].chunk(k)))
            loss = accumulated_step(optimizer, model, micro_batches, loss_of)  # one SAM step
            scheduler.step()
        print(f"epoch {epoch}: last batch loss {loss.item():.4f}")

    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(x_all), y_all).item()
    print(f"final loss {loss:.4f} (chance level {math.log(CLASSES):.4f})")


if __name__ == "__main__":
    main()
