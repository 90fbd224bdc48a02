"""F-SAM with a timm model, timm's parameter groups and timm's LR schedulers.

timm's schedulers write ``lr`` into ``optimizer.param_groups``, which for F-SAM are the
base optimizer's own groups. The check: F-SAM with ``rho = 0`` perturbs by exactly zero,
so under the same timm schedule it must take exactly the steps of the plain base optimizer;
a schedule that failed to reach the base optimizer's groups would show as a difference.
"""

from __future__ import annotations

import pytest

pytest.importorskip("timm", reason="timm is not installed (pip install --no-build-isolation -e '.[test]')")

import timm  # noqa: E402
import timm.optim  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402

from fsam_fused import FriendlySAM  # noqa: E402
from tests.example_scripts import run_example  # noqa: E402

EPOCHS, UPDATES_PER_EPOCH, BATCH = 2, 3, 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3).eval()  # eval: no batch-statistics noise


def _train(sam: bool, step_on_epochs: bool) -> tuple[list[torch.Tensor], list[float]]:
    model = _model()
    groups = timm.optim.param_groups_weight_decay(model, weight_decay=1e-2)
    if sam:
        optimizer = FriendlySAM(groups, torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=EPOCHS,
        warmup_epochs=1,
        warmup_lr=0.01,
        step_on_epochs=step_on_epochs,
        updates_per_epoch=UPDATES_PER_EPOCH,
    )
    g = torch.Generator().manual_seed(1)
    lrs, num_updates = [], 0
    for epoch in range(EPOCHS):
        for _ in range(UPDATES_PER_EPOCH):
            x, y = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
            F.cross_entropy(model(x), y).backward()
            if sam:
                optimizer.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.second_step(zero_grad=True)
            else:
                optimizer.step()
                optimizer.zero_grad()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch + 1)
    if sam:
        assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    return [p.detach().clone() for p in model.parameters()], lrs


@pytest.mark.parametrize("step_on_epochs", [False, True], ids=["per_update", "per_epoch"])
def test_timm_scheduler_drives_the_base_optimizer(step_on_epochs):
    sam_params, sam_lrs = _train(sam=True, step_on_epochs=step_on_epochs)
    plain_params, plain_lrs = _train(sam=False, step_on_epochs=step_on_epochs)
    assert sam_lrs == plain_lrs and len(set(sam_lrs)) > 1, sam_lrs  # the schedule really moved
    for a, b in zip(sam_params, plain_params, strict=True):
        assert torch.equal(a, b)


def test_example_script_learns():
    out = run_example("timm_fsam.py", "--epochs", "3", "--train-size", "192", "--batch-size", "16")
    assert "steps 36, skipped 0" in out, out
    accuracy = float(out.split("accuracy ")[1].split()[0])
    assert accuracy > 0.9, out  # 4 classes: chance is 0.25


def test_example_script_runs_fp16_with_a_grad_scaler():
    out = run_example(
        "timm_fsam.py", "--amp", "fp16", "--epochs", "1", "--train-size", "32", "--batch-size", "16"
    )
    assert "steps 2, skipped 0" in out, out
