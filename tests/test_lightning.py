"""F-SAM in PyTorch Lightning's manual optimisation, on Lightning's CPU trainer.

The LightningModule is the one in ``examples/lightning_fsam.py`` (the docs show it): its
steps equal the plain PyTorch loop of the README, a run stopped halfway, saved and resumed
by Lightning ends bit for bit where the straight run does, in fp32, bf16-mixed and fp16
with a GradScaler (``SAMMixedPrecision``), and the wrong orders of calls raise.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "lightning", reason="lightning is not installed (pip install --no-build-isolation -e '.[test]')"
)

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from examples.lightning_fsam import FSAMClassifier, make_trainer, synthetic_data, train  # noqa: E402
from fsam_fused import running_stats_frozen  # noqa: E402
from fsam_fused.integrations.lightning import SAMMixedPrecision  # noqa: E402
from tests.example_scripts import run_example  # noqa: E402

EPOCHS = 2
PRECISIONS = ["32-true", "bf16-mixed", "16-mixed"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resumed_run_ends_bit_identical_to_the_straight_run(precision, tmp_path):
    straight = train(precision, EPOCHS)
    halfway = tmp_path / "halfway.ckpt"
    train(precision, EPOCHS, stop_after=EPOCHS // 2, checkpoint=halfway)
    resumed = train(precision, EPOCHS, resume=halfway)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{precision}: {name} differs after resuming"


def test_steps_equal_the_plain_training_loop_and_count_as_global_steps():
    loader = synthetic_data()
    torch.manual_seed(0)
    module = FSAMClassifier(total_steps=EPOCHS * len(loader))
    trainer = make_trainer("32-true", EPOCHS)
    trainer.fit(module, loader)
    assert trainer.global_step == EPOCHS * len(loader)

    torch.manual_seed(0)
    plain = FSAMClassifier(total_steps=EPOCHS * len(loader))
    optimizers = plain.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]
    for _ in range(EPOCHS):
        for x, y in loader:
            F.cross_entropy(plain.net(x), y).backward()
            optimizer.first_step(zero_grad=True)
            with running_stats_frozen(plain.net):
                F.cross_entropy(plain.net(x), y).backward()
            optimizer.second_step(zero_grad=True)
            scheduler.step()
    for (name, a), b in zip(module.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: the Lightning step differs from the plain loop"


def test_sam_mixed_precision_scales_the_loss_and_keeps_the_scaler_in_the_checkpoint(tmp_path):
    loader = synthetic_data()
    torch.manual_seed(0)
    module = FSAMClassifier(total_steps=len(loader))
    trainer = make_trainer("16-mixed", 1)
    trainer.fit(module, loader)
    scaler = trainer.precision_plugin.scaler
    assert isinstance(trainer.precision_plugin, SAMMixedPrecision) and scaler.is_enabled()
    assert module.optimizers().optimizer.skipped_steps == 0
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert saved["SAMMixedPrecision"]["scale"] == scaler.get_scale()


def _fit_one_batch(module: L.LightningModule, **trainer_kwargs) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, synthetic_data())


class AutomaticOptimization(FSAMClassifier):
    """The authors'-style training_step: return the loss and let Lightning step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


class StepWithoutClosure(FSAMClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x), y))
        self.optimizers().step()


class NoFirstBackward(FSAMClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.optimizers().step(closure=lambda: self.manual_backward(F.cross_entropy(self.net(x), y)))


@pytest.mark.parametrize(
    ("module", "kwargs", "message"),
    [
        (AutomaticOptimization, {}, "automatic_optimization = False"),
        (
            AutomaticOptimization,
            dict(plugins=[SAMMixedPrecision("16-mixed", "cpu")]),
            "automatic_optimization",
        ),
        (StepWithoutClosure, {}, "without a closure"),
        (StepWithoutClosure, dict(plugins=[SAMMixedPrecision("16-mixed", "cpu")]), "without a closure"),
        (NoFirstBackward, {}, "found no gradient: run the first forward and backward"),
        (
            NoFirstBackward,
            dict(plugins=[SAMMixedPrecision("16-mixed", "cpu")]),
            "found no gradient: run the first forward and backward",
        ),
        (FSAMClassifier, dict(plugins=[MixedPrecision("16-mixed", "cpu")]), "SAMMixedPrecision"),
    ],
    ids=[
        "automatic_optimization",
        "automatic_optimization_fp16",
        "step_without_closure",
        "step_without_closure_fp16",
        "no_first_backward",
        "no_first_backward_fp16",
        "stock_16_mixed",
    ],
)
def test_wrong_order_of_calls_raises_with_the_fix(module, kwargs, message):
    with pytest.raises(RuntimeError, match=message):
        _fit_one_batch(module(), **kwargs)


class EveryThirdStepSAM(FSAMClassifier):
    def configure_optimizers(self) -> dict:
        configured = super().configure_optimizers()
        configured["optimizer"].sam_interval = 3
        return configured


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_sam_interval_takes_plain_steps_with_and_without_the_fp16_plugin(precision, monkeypatch):
    from fsam_fused import FriendlySAM

    calls = {"first_step": 0, "plain_step": 0}
    for name in calls:
        original = getattr(FriendlySAM, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(FriendlySAM, name, counted)
    loader = synthetic_data()
    trainer = make_trainer(precision, 1)
    trainer.fit(EveryThirdStepSAM(total_steps=len(loader)), loader)
    sam_steps = -(-len(loader) // 3)
    assert calls == {"first_step": sam_steps, "plain_step": len(loader) - sam_steps}


class FailingSecondPass(FSAMClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x), y))
        self.before = [p.detach().clone() for p in self.net.parameters()]

        def second_pass():
            raise ValueError("the second pass failed")

        self.optimizers().step(closure=second_pass)


class CountedSteps(FSAMClassifier):
    def configure_optimizers(self) -> dict:
        configured = super().configure_optimizers()
        self.step_hooks = []
        configured["optimizer"].register_step_post_hook(lambda opt, args, kwargs: self.step_hooks.append(1))
        return configured


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_the_optimizers_step_hooks_run_with_and_without_the_fp16_plugin(precision):
    loader = synthetic_data()
    module = CountedSteps(total_steps=len(loader))
    make_trainer(precision, 1).fit(module, loader)
    assert len(module.step_hooks) == len(loader)


def test_a_closure_that_raises_under_the_fp16_plugin_puts_the_parameters_back():
    module = FailingSecondPass()
    with pytest.raises(ValueError, match="the second pass failed"):
        _fit_one_batch(module, plugins=[SAMMixedPrecision("16-mixed", "cpu")])
    optimizer = module.optimizers().optimizer
    assert not optimizer._pending.perturbed
    for p, before in zip(module.net.parameters(), module.before, strict=True):
        assert torch.equal(p, before)


def test_example_script_learns_and_resumes_bit_identically():
    out = run_example("lightning_fsam.py", "--epochs", "2", "--resume-check", "--precision", "bf16-mixed")
    final_loss = float(out.split("final loss ")[1].split()[0])
    assert final_loss < 1.1, out  # chance level is log(4) = 1.39
    assert "resumed run equals the straight run bit for bit: True" in out, out
