"""F-SAM under Hugging Face Accelerate on the CPU: a prepared optimizer, accumulate, mixed precision.

Accelerate makes no GradScaler on the CPU (its fp16 needs a GPU), so the fp16 path's wiring
(the scaler handed to both halves, ``update`` after the step, an overflow skipping it) is
tested with a CPU ``torch.amp.GradScaler`` put where accelerate keeps its own.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "accelerate", reason="accelerate is not installed (pip install --no-build-isolation -e '.[test]')"
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fsam_fused import FriendlySAM  # noqa: E402
from fsam_fused.integrations.accelerate import first_step, second_step, unwrap  # noqa: E402
from tests.example_scripts import run_example  # noqa: E402

K = 3
MICRO = 4
STEPS = 3


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; its own tests reset it like this between runs."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(dtype: torch.dtype = torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = STEPS * K * MICRO
    return TensorDataset(torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))


def _optimizer(model: nn.Module) -> FriendlySAM:
    return FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.3, lmbda=0.6, lr=0.1, momentum=0.9)


def _one_pass(accelerator: Accelerator, model: nn.Module, micro_batches: list) -> None:
    for x, y in micro_batches:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))


def _train_accelerated(accelerator: Accelerator, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    model = _model(dtype)
    optimizer = _optimizer(model)
    loader = DataLoader(_data(dtype), batch_size=MICRO)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batches = list(loader)
    for start in range(0, len(batches), K):
        micro_batches = batches[start : start + K]
        _one_pass(accelerator, model, micro_batches)
        first_step(accelerator, optimizer)
        _one_pass(accelerator, model, micro_batches)
        second_step(accelerator, optimizer)
    return [p.detach().clone() for p in model.parameters()]


def test_accumulated_micro_batches_equal_one_batch_k_times_larger():
    got = _train_accelerated(Accelerator(cpu=True, gradient_accumulation_steps=K), torch.float64)
    model = _model(torch.float64)
    optimizer = _optimizer(model)
    x_all, y_all = _data(torch.float64).tensors
    for x, y in zip(x_all.split(K * MICRO), y_all.split(K * MICRO)):
        F.cross_entropy(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
    for a, b in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


def test_bf16_autocast_covers_both_passes():
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=K)
    dtypes = []
    original_forward = nn.Linear.forward
    try:
        nn.Linear.forward = lambda self, x: dtypes.append(out := original_forward(self, x)) or out
        params = _train_accelerated(accelerator)
    finally:
        nn.Linear.forward = original_forward
    assert dtypes and all(d.dtype == torch.bfloat16 for d in dtypes), {d.dtype for d in dtypes}
    assert len(dtypes) == 2 * 2 * STEPS * K  # two layers, two passes, every micro-batch
    assert all(p.isfinite().all() for p in params)
    assert not torch.equal(params[0], _model()[0].weight.detach())


def _with_cpu_scaler() -> tuple[Accelerator, torch.amp.GradScaler]:
    """An accelerator holding a GradScaler that doubles its scale after every step without overflow."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=K)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    return accelerator, accelerator.scaler


def test_grad_scaler_drives_both_halves_and_is_updated():
    accelerator, scaler = _with_cpu_scaler()
    scaled = _train_accelerated(accelerator)
    assert scaler.get_scale() == 2.0 ** (10 + STEPS)  # updated once per step, never backed off
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    unscaled = _train_accelerated(Accelerator(cpu=True, gradient_accumulation_steps=K))
    for a, b in zip(scaled, unscaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_overflow_in_the_first_pass_skips_the_step_and_backs_off():
    accelerator, scaler = _with_cpu_scaler()
    model = _model()
    initial = [p.detach().clone() for p in model.parameters()]
    model, optimizer = accelerator.prepare(model, _optimizer(model))
    x, y = _data().tensors
    micro_batches = list(zip(x[: K * MICRO].split(MICRO), y[: K * MICRO].split(MICRO)))
    overflow = model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    _one_pass(accelerator, model, micro_batches)
    overflow.remove()
    first_step(accelerator, optimizer)
    _one_pass(accelerator, model, micro_batches)
    second_step(accelerator, optimizer)
    for a, b in zip(model.parameters(), initial, strict=True):
        assert torch.equal(a.detach(), b)
    assert unwrap(optimizer).skipped_steps == 1
    assert scaler.get_scale() == 2.0**9


def test_first_step_inside_an_accumulation_window_raises():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=K)
    model, optimizer = accelerator.prepare(*(lambda m: (m, _optimizer(m)))(_model()))
    x, y = _data().tensors
    _one_pass(accelerator, model, [(x[:MICRO], y[:MICRO])])
    with pytest.raises(RuntimeError, match="inside an accumulation window"):
        first_step(accelerator, optimizer)


def test_the_wrappers_step_without_a_closure_says_what_to_call():
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*(lambda m: (m, _optimizer(m)))(_model()))
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step()


def test_unwrap_refuses_other_optimizers():
    accelerator = Accelerator(cpu=True)
    model = _model()
    _, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="FriendlySAM or SAM"):
        unwrap(optimizer)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_example_script_learns(precision):
    out = run_example("accelerate_fsam.py", "--mixed-precision", precision, "--epochs", "2")
    final_loss = float(out.split("final loss ")[1].split()[0])
    assert final_loss < 1.0, out  # chance level is log(4) = 1.39
