"""Gradient accumulation: k micro-batches make the same step as one batch k times the size.

BatchNorm in training mode normalises with the statistics of the batch it sees, so k
micro-batches normalise each micro-batch on its own, and one large batch does not: the two
are different functions of the weights. The comparison uses what accumulation does compute,
the large batch with its BatchNorm statistics taken per group of micro-batch size ("ghost"
batch norm), written here as a module of its own: on a micro-batch it is plain BatchNorm.
Its running statistics then move through the same groups in the same order, so they are
compared too. DDP: ``tests/test_distributed.py`` runs the helper on gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsam_fused import FriendlySAM, accumulated_step, running_stats_frozen
from tests.example_scripts import run_example

K = 3
MICRO = 4
STEPS = 3
FP64 = dict(rtol=1e-10, atol=1e-12)


class GhostBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over consecutive groups of ``group`` samples, one group after another."""

    def __init__(self, features: int, group: int) -> None:
        super().__init__(features)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([super(GhostBatchNorm1d, self).forward(part) for part in x.split(self.group)])


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), GhostBatchNorm1d(8, MICRO), nn.Tanh(), nn.Linear(8, 3))
    return model.double()


def _batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(K * MICRO, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (K * MICRO,), generator=g),
        )
        for _ in range(STEPS)
    ]


def _optimizer(model: nn.Module, backend: str, sam_interval: int = 1) -> FriendlySAM:
    """Two groups, one adaptive, rho large enough that a wrong perturbation shows."""
    params = list(model.parameters())
    groups = [dict(params=params[:2], adaptive=True, rho=0.4), dict(params=params[2:])]
    return FriendlySAM(
        groups,
        torch.optim.SGD,
        rho=0.3,
        lmbda=0.6,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-2,
        backend=backend,
        sam_interval=sam_interval,
    )


def _state(model: nn.Module, opt: FriendlySAM) -> dict[str, list[Tensor]]:
    params = list(model.parameters())
    return {
        "params": [p.detach().clone() for p in params],
        "momentum": [opt.state[p]["momentum"].clone() for p in params],
        "base momentum": [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in params],
        "buffers": [b.clone() for b in model.buffers()],
    }


def _one_large_batch(backend: str, freeze: bool) -> tuple[dict, list[Tensor]]:
    model = _model()
    opt = _optimizer(model, backend)
    losses = []
    for x, y in _batches():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        if freeze:
            with running_stats_frozen(model):
                F.cross_entropy(model(x), y).backward()
        else:
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        losses.append(loss.detach())
    return _state(model, opt), losses


def _micro_batches(backend: str, freeze: bool) -> tuple[dict, list[Tensor]]:
    model = _model()
    opt = _optimizer(model, backend)
    losses = []
    for x, y in _batches():
        micro = list(zip(x.split(MICRO), y.split(MICRO)))
        loss = accumulated_step(
            opt, model, micro, lambda b: F.cross_entropy(model(b[0]), b[1]), freeze_running_stats=freeze
        )
        losses.append(loss)
    return _state(model, opt), losses


@pytest.mark.parametrize("freeze", [True, False], ids=["bn_frozen", "bn_tracking"])
def test_k_micro_batches_equal_one_batch_k_times_larger(backend, freeze):
    expected, expected_losses = _one_large_batch(backend, freeze)
    got, losses = _micro_batches(backend, freeze)
    for key, want in expected.items():
        for i, (a, b) in enumerate(zip(got[key], want, strict=True)):
            torch.testing.assert_close(a, b, **FP64, msg=lambda m, key=key, i=i: f"{key}[{i}]: {m}")
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses), **FP64)


def test_with_sam_interval_plain_steps_come_between_the_sam_steps(backend):
    def train(accumulated: bool) -> dict[str, list[Tensor]]:
        model = _model()
        opt = _optimizer(model, backend, sam_interval=2)
        for x, y in _batches():
            if accumulated:
                micro = list(zip(x.split(MICRO), y.split(MICRO)))
                accumulated_step(opt, model, micro, lambda b: F.cross_entropy(model(b[0]), b[1]))
            elif opt.sam_due:
                F.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
                with running_stats_frozen(model):
                    F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                F.cross_entropy(model(x), y).backward()
                opt.plain_step(zero_grad=True)
        return _state(model, opt)

    expected, got = train(accumulated=False), train(accumulated=True)
    for key, want in expected.items():
        for i, (a, b) in enumerate(zip(got[key], want, strict=True)):
            torch.testing.assert_close(a, b, **FP64, msg=lambda m, key=key, i=i: f"{key}[{i}]: {m}")


def test_the_docs_recipe_without_the_helper_makes_the_same_step():
    """The loop that docs/training_loops.md shows for those who write it out (its lines are checked there)."""
    model = _model()
    optimizer = _optimizer(model, "torch")
    for x_batch, y_batch in _batches():
        micro_batches = list(zip(x_batch.split(MICRO), y_batch.split(MICRO)))
        k = len(micro_batches)
        for x, y in micro_batches:  # first pass: every micro-batch, at w
            (F.cross_entropy(model(x), y) / k).backward()
        optimizer.first_step(zero_grad=True)  # w <- w + e, once, from the whole batch's gradient
        with running_stats_frozen(model):  # BatchNorm statistics move in the first pass only
            for x, y in micro_batches:  # second pass: the same micro-batches, at w + e
                (F.cross_entropy(model(x), y) / k).backward()
        optimizer.second_step(zero_grad=True)  # restore w, one base optimizer step
    expected, _ = _micro_batches("torch", freeze=True)
    for key, want in expected.items():
        for a, b in zip(_state(model, optimizer)[key], want, strict=True):
            assert torch.equal(a, b), key


def test_running_statistics_move_once_per_micro_batch_of_the_first_pass_when_frozen():
    state, _ = _micro_batches("torch", freeze=True)
    assert int(state["buffers"][-1]) == STEPS * K  # num_batches_tracked
    state, _ = _micro_batches("torch", freeze=False)
    assert int(state["buffers"][-1]) == 2 * STEPS * K


def test_grad_scaler_is_handed_to_both_halves():
    """Scaled losses, and a scaler given to first_step and second_step, make the unscaled step."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.3, lmbda=0.6, lr=0.1, momentum=0.9)
        for x, y in _batches():
            micro = list(zip(x.float().split(MICRO), y.split(MICRO)))
            accumulated_step(
                opt, model, micro, lambda b: F.cross_entropy(model(b[0]), b[1]), grad_scaler=scaler
            )
            if scaler is not None:
                scaler.update()
        assert opt.skipped_steps == 0
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _setup() -> tuple[nn.Module, FriendlySAM, list]:
    model = nn.Linear(2, 1)
    return model, FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1), [torch.randn(3, 2)]


def test_micro_batches_must_be_a_sequence():
    model, opt, micro = _setup()
    with pytest.raises(TypeError, match="micro_batches must be a list or tuple"):
        accumulated_step(opt, model, (b for b in micro), lambda b: model(b).sum())


def test_micro_batches_must_not_be_empty():
    model, opt, _ = _setup()
    with pytest.raises(ValueError, match="micro_batches is empty"):
        accumulated_step(opt, model, [], lambda b: model(b).sum())


def test_optimizer_must_be_ours_not_a_wrapper():
    model, _, micro = _setup()
    with pytest.raises(TypeError, match="optimizer must be a fsam_fused FriendlySAM or SAM"):
        accumulated_step(torch.optim.SGD(model.parameters(), lr=0.1), model, micro, lambda b: model(b).sum())


def test_per_worker_mode_needs_ddp():
    model, opt, micro = _setup()
    with pytest.raises(TypeError, match="wrap the model in DDP"):
        accumulated_step(opt, model, micro, lambda b: model(b).sum(), mode="per_worker")


def test_example_script_learns():
    out = run_example("accumulation.py", "--epochs", "2")
    final_loss = float(out.split("final loss ")[1].split()[0])
    assert final_loss < 0.8, out  # chance level is log(4) = 1.39
