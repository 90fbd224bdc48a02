"""F-SAM with a timm model, timm's parameter groups and timm's LR scheduler, under AMP.

    python examples/timm_fsam.py                 # fp32
    python examples/timm_fsam.py --amp bf16      # autocast to bf16
    python examples/timm_fsam.py --amp fp16      # autocast to fp16 with a GradScaler (GPU or CPU)

Trains timm's ``test_resnet`` (a ResNet of 0.4 M parameters with BatchNorm, random weights)
to tell apart 32x32 noise images by the quadrant that is brighter. The loop is timm's:
``step_update`` after every update, ``step`` after every epoch. timm's ``NativeScaler``
calls ``scaler.step(optimizer)``, which cannot run the two halves of a SAM step, so the
GradScaler is used directly and handed to ``first_step`` and ``second_step``.
"""

from __future__ import annotations

import argparse
import math

import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.scheduler import create_scheduler_v2
from torch import Tensor

from fsam_fused import FriendlySAM, running_stats_frozen

CLASSES, SIZE = 4, 32


def quadrant_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Noise images with one brighter quadrant; the label says which."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    half = SIZE // 2
    for i, label in enumerate(y.tolist()):
        row, col = divmod(label, 2)
        x[i, :, row * half : (row + 1) * half, col * half : (col + 1) * half] += 1.0
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=512)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=CLASSES).to(device)
    param_groups = timm.optim.param_groups_weight_decay(model, weight_decay=1e-3)  # none on norms, biases
    optimizer = FriendlySAM(param_groups, torch.optim.SGD, rho=0.1, lmbda=0.6, lr=0.05, momentum=0.9)
    x_train, y_train = quadrant_images(args.train_size, seed=1)
    batches = list(zip(x_train.split(args.batch_size), y_train.split(args.batch_size)))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=1, step_on_epochs=False,
        updates_per_epoch=len(batches),
    )  # fmt: skip
    dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def loss_at_current_weights(x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=args.amp != "none"):
            return F.cross_entropy(model(x), y)

    num_updates = 0
    for epoch in range(args.epochs):
        model.train()
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            scaler.scale(loss_at_current_weights(x, y)).backward()  # first pass, at w
            optimizer.first_step(zero_grad=True, grad_scaler=scaler)  # w <- w + e
            with running_stats_frozen(model):  # BatchNorm statistics move once per batch
                scaler.scale(loss_at_current_weights(x, y)).backward()  # second pass, at w + e
            optimizer.second_step(zero_grad=True, grad_scaler=scaler)  # restore w, SGD step
            scaler.update()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
        scheduler.step(epoch + 1)

    x_test, y_test = quadrant_images(256, seed=2)
    model.eval()
    with torch.no_grad():
        logits = model(x_test.to(device)).float()
    loss = F.cross_entropy(logits, y_test.to(device)).item()
    accuracy = (logits.argmax(1).cpu() == y_test).float().mean().item()
    print(f"steps {num_updates}, skipped {optimizer.skipped_steps}")
    print(f"test loss {loss:.4f} (chance level {math.log(CLASSES):.4f}), accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
