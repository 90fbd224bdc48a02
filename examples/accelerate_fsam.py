"""F-SAM with Hugging Face Accelerate: a prepared optimizer, mixed precision, accumulation.

    python examples/accelerate_fsam.py                            # fp32, 4 micro-batches a step
    python examples/accelerate_fsam.py --mixed-precision bf16
    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 examples/accelerate_fsam.py  # DDP, gloo

A small classifier on a synthetic task (labels from a fixed random linear map). Each
optimizer step takes ``--accumulation`` micro-batches through both passes of the SAM step:
accelerate's ``accumulate`` scales each loss by 1 / k and keeps DDP from all-reducing until
the last micro-batch of each pass.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fsam_fused import FriendlySAM, running_stats_frozen
from fsam_fused.integrations.accelerate import first_step, second_step

FEATURES, CLASSES, SAMPLES, MICRO_BATCH = 16, 4, 512, 16


def synthetic_data() -> TensorDataset:
    """A fixed, learnable data set: the labels are the argmax of a random linear map."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    return TensorDataset(x, (x @ torch.randn(FEATURES, CLASSES, generator=g)).argmax(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.accumulation
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, CLASSES))
    optimizer = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, lmbda=0.6, lr=0.1, momentum=0.9)
    loader = DataLoader(synthetic_data(), batch_size=MICRO_BATCH, shuffle=True)
    steps = args.epochs * math.ceil(len(loader) / args.accumulation)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for _ in range(args.epochs):
        micro_batches = []
        for batch in loader:
            micro_batches.append(batch)
            if len(micro_batches) < args.accumulation and not accelerator.gradient_state.end_of_dataloader:
                continue
            for x, y in micro_batches:  # first pass, at w
                with accelerator.accumulate(model):
                    accelerator.backward(F.cross_entropy(model(x), y))
            first_step(accelerator, optimizer)  # w <- w + e, from the whole batch's gradient
            with running_stats_frozen(model):  # BatchNorm statistics move in the first pass only
                for x, y in micro_batches:  # second pass, over the same micro-batches, at w + e
                    with accelerator.accumulate(model):
                        accelerator.backward(F.cross_entropy(model(x), y))
            second_step(accelerator, optimizer)  # restore w, base optimizer step
            scheduler.step()
            micro_batches = []

    x, y = (t.to(accelerator.device) for t in synthetic_data().tensors)
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(x), y).item()
    accelerator.print(f"final loss {loss:.4f} (chance level {math.log(CLASSES):.4f})")


if __name__ == "__main__":
    main()
