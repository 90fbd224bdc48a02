"""F-SAM in PyTorch Lightning: manual optimisation, an LR schedule, mixed precision, resume.

    python examples/lightning_fsam.py                          # fp32
    python examples/lightning_fsam.py --precision bf16-mixed
    python examples/lightning_fsam.py --precision 16-mixed     # fp16 autocast + GradScaler
    python examples/lightning_fsam.py --resume-check           # stop halfway, save, resume

A small classifier with BatchNorm on a synthetic task (labels from a fixed random linear
map), so that the loss visibly falls in a few seconds on a CPU. ``--resume-check`` trains
straight through, then again in two halves with a checkpoint between them saved and loaded
by Lightning, and reports whether both end with the same parameters, bit for bit.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fsam_fused import FriendlySAM, running_stats_frozen
from fsam_fused.integrations.lightning import SAMMixedPrecision, SAMStepChecks

FEATURES, CLASSES, SAMPLES, BATCH = 16, 4, 256, 32


class FSAMClassifier(L.LightningModule):
    """A classifier trained with F-SAM: each training step is a whole two-pass SAM step."""

    def __init__(self, lr: float = 0.05, rho: float = 0.1, total_steps: int = 40) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # a SAM step is two passes: training_step runs it
        self.net = nn.Sequential(
            nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, CLASSES)
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        optimizer = self.optimizers()
        loss = F.cross_entropy(self.net(x), y)
        self.manual_backward(loss)  # first pass, at w

        def second_pass() -> Tensor:
            with running_stats_frozen(self.net):  # BatchNorm statistics move once per batch
                perturbed_loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(perturbed_loss)
            return perturbed_loss

        optimizer.step(closure=second_pass)  # first_step, the closure at w + e, second_step
        optimizer.zero_grad()
        self.lr_schedulers().step()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = FriendlySAM(
            self.parameters(),
            torch.optim.SGD,
            rho=self.hparams.rho,
            sigma=1.0,
            lmbda=0.6,
            lr=self.hparams.lr,
            momentum=0.9,
            weight_decay=1e-3,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_callbacks(self) -> list[L.Callback]:
        return [SAMStepChecks()]


def synthetic_data() -> DataLoader:
    """A fixed, learnable data set: the labels are the argmax of a random linear map."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = (x @ torch.randn(FEATURES, CLASSES, generator=g)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)  # fixed order: resumable as is


def make_trainer(precision: str, max_epochs: int, **kwargs) -> L.Trainer:
    """A CPU or GPU Trainer; ``"16-mixed"`` goes through the plugin that drives a SAM step."""
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if precision == "16-mixed":
        kwargs["plugins"] = [SAMMixedPrecision("16-mixed", "cuda" if accelerator == "gpu" else "cpu")]
    else:
        kwargs["precision"] = precision
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def train(
    precision: str,
    epochs: int,
    stop_after: int | None = None,
    checkpoint: Path | None = None,
    resume: Path | None = None,
) -> FSAMClassifier:
    """Train on a schedule of ``epochs`` epochs, stopping after ``stop_after`` of them (default: all).

    ``resume``: a checkpoint to continue from; ``checkpoint``: where to save at the end.
    """
    torch.manual_seed(0 if resume is None else 1)  # a resumed model's own initial weights must not matter
    loader = synthetic_data()
    model = FSAMClassifier(total_steps=epochs * len(loader))
    trainer = make_trainer(precision, stop_after or epochs)
    trainer.fit(model, loader, ckpt_path=resume)
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default="32-true")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resume-check", action="store_true")
    args = parser.parse_args()

    model = train(args.precision, args.epochs)
    x, y = synthetic_data().dataset.tensors
    with torch.no_grad():
        loss = F.cross_entropy(model.net.eval()(x), y).item()
    print(f"final loss {loss:.4f} (chance level {math.log(CLASSES):.4f})")
    if args.resume_check:
        with tempfile.TemporaryDirectory() as tmp:
            halfway = Path(tmp) / "halfway.ckpt"
            train(args.precision, args.epochs, stop_after=args.epochs // 2, checkpoint=halfway)
            resumed = train(args.precision, args.epochs, resume=halfway)
        same = all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values())
        )
        print(f"resumed run equals the straight run bit for bit: {same}")


if __name__ == "__main__":
    main()
