"""The optimizer-step benchmark: first_step + second_step per backend on a preset's shapes.

The base optimizer here is a no-op, so the times are the SAM work alone (norm, EMA,
perturbation, backup, restore) that the bytes model of DESIGN.md section 3 describes;
the base step is the same for every backend and is measured by the end-to-end benchmark.
Before a backend is timed it must agree with ``reference`` over a few steps on the same
shapes (the gate); a backend that disagrees is reported as failing and not timed.

On CUDA, each backend's step is timed a second time as the replay of a CUDA graph that
captured it (rows named ``<backend> graph``): what the eager step costs beyond it is host work.
Each backend runs each requested SAM variant (:data:`VARIANTS`), and PyTorch's own
``SGD(foreach=True)`` and ``AdamW(fused=True)`` steps are timed beside them on the same
tensors as anchors (:data:`ANCHORS`): on a preset of many tiny tensors, step time minus
the bytes floor is host work, and theirs is the per-tensor overhead to beat. A third anchor
times the no-op base optimizer's own step, the part of every row's time that is torch.optim's.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fsam_fused import FriendlySAM
from fsam_fused import testing as tolerances

from .agreement import Verdict, compare
from .bytes_model import step_bytes
from .measure import Budget, Summary, peak_memory_bytes, time_interleaved
from .presets import numel, parameter_shapes, subset_within

# The authors' CIFAR hyperparameters (DESIGN.md section 1).
FSAM_KWARGS = dict(rho=0.1, sigma=1.0, lmbda=0.6)
GATE_STEPS = 3
# The SAM variants of the normalisation operator (fsam_fused.hparams), on top of FSAM_KWARGS.
VARIANTS: dict[str, dict[str, Any]] = {
    "fsam": {},
    "fisher": dict(fisher_eta=1.0),
    "asam": dict(adaptive=True),
    "asam_eta": dict(adaptive=True, adaptive_eta=0.01),
}
DEFAULT_VARIANT = "fsam"
# The plain step each variant is compared with besides DEFAULT_VARIANT: the same variant
# with its eta at 0. ASAM's is ASAM, not F-SAM: ASAM reads p in the norm pass as well (more
# bytes per element, whatever eta), so only against ASAM does the eta's own cost show.
PLAIN_STEP: dict[str, str] = {"fisher": "fsam", "asam": "fsam", "asam_eta": "asam"}
# On CUDA each backend's step is also timed as a replay of a captured CUDA graph, in a row
# named after the backend with this suffix.
CAPTURED = " graph"
CAPTURE_WARMUP = 3  # eager steps on a side stream before the capture, as README's CUDA graphs section asks


class NoBaseStep(torch.optim.Optimizer):
    """A base optimizer that does nothing, so a timed step is the SAM work alone.

    It declares device-side skip support, as fused PyTorch optimizers do, so that
    second_step never reads the found-inf flag back to the host.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, dict(kwargs))

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        return None


# PyTorch's own optimizers, timed on the same tensors (lr 0 leaves them unchanged), with the
# bytes they move per element in units of the parameter's element size. The no-op is what
# every eager SAM row's second_step spends calling its base optimizer: torch.optim's step wrapper
# (profiler range, hooks) around nothing, a fixed cost that any optimizer's step pays too.
ANCHORS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any], int]] = {
    "torch SGD foreach": (torch.optim.SGD, dict(lr=0.0, momentum=0.9, foreach=True), 5),  # p g buf / p buf
    "torch AdamW fused": (torch.optim.AdamW, dict(lr=0.0, fused=True), 7),  # p g m v / p m v
    "torch no-op step": (NoBaseStep, {}, 0),
}


@dataclass
class StepResult:
    """One backend on one preset, device and dtype."""

    preset: str
    device: str
    dtype: str
    backend: str
    tensors: int
    numel: int
    variant: str = DEFAULT_VARIANT  # "" for an anchor
    status: str = "ok"  # "ok", or "FAILED: <why>"
    gate: str = ""
    first: Summary | None = None
    second: Summary | None = None
    total: Summary | None = None
    model_bytes: int = 0
    peak_first_call_bytes: int | None = None
    peak_steady_bytes: int | None = None
    derived: dict[str, float] = field(default_factory=dict)  # speedup, bandwidth: filled by the caller

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_anchor(self) -> bool:
        return self.backend in ANCHORS

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("first", "second", "total", "derived")}
        for phase in ("first", "second", "total"):
            summary = getattr(self, phase)
            out[f"{phase}_ms"] = summary.as_dict() if summary is not None else None
        out.update(self.derived)
        return out


def make_params(shapes, device: torch.device, dtype: torch.dtype, seed: int) -> list[nn.Parameter]:
    """Random parameters of the given shapes, with random gradients attached."""
    gen = torch.Generator(device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(_randn(shape, gen, device, dtype))
        p.grad = _randn(shape, gen, device, dtype)
        params.append(p)
    return params


def _randn(shape, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Drawn on the device itself: host-side draws of ViT/GPT-2 sizes would dominate a GPU run.
    return torch.randn(shape, generator=gen, device=device).to(dtype)


def _optimizer(
    params: list[nn.Parameter],
    backend: str,
    base: Callable[..., torch.optim.Optimizer],
    variant: str = DEFAULT_VARIANT,
    **kw: Any,
):
    return FriendlySAM(params, base, backend=backend, **FSAM_KWARGS, **VARIANTS[variant], **kw)


def _gate_trace(
    shapes, backend: str, device: torch.device, dtype: torch.dtype, seed: int, variant: str = DEFAULT_VARIANT
) -> list[list[Tensor]]:
    params = make_params(shapes, device, dtype, seed)
    opt = _optimizer(params, backend, torch.optim.SGD, variant, lr=0.05, momentum=0.9)
    gen = torch.Generator(device).manual_seed(seed + 1)
    trace = []
    for _ in range(GATE_STEPS):
        for p in params:
            p.grad = _randn(p.shape, gen, device, dtype)
        opt.first_step()
        trace.append([p.detach().clone() for p in params])
        for p in params:
            p.grad = _randn(p.shape, gen, device, dtype)
        opt.second_step()
        trace.append([p.detach().clone() for p in params])
    return trace


def gate(
    shapes,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    variant: str = DEFAULT_VARIANT,
) -> Verdict:
    """Does ``backend`` give the reference's perturbed and updated parameters over a few steps?"""
    expected = _gate_trace(shapes, "reference", device, dtype, seed, variant)
    actual = _gate_trace(shapes, backend, device, dtype, seed, variant)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        verdict = compare(
            a, e, f"step {step // 2} {'updated' if step % 2 else 'perturbed'} p", **tolerances.step(dtype)
        )
        if not verdict:
            return verdict
    return Verdict(True, f"{GATE_STEPS} steps, {len(shapes)} tensors, {verdict.detail}")


def _check(shapes, backend: str, device: torch.device, dtype: torch.dtype, variant: str) -> Verdict:
    try:
        return gate(shapes, backend, device, dtype, variant=variant)
    except Exception as exc:  # a crashing backend is a failing backend: reported, not timed
        return Verdict(False, f"{type(exc).__name__}: {exc}")


def run_preset(
    preset: str,
    backend_names: list[str],
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    gate_max_elements: int | None,
    progress: Callable[[str], None],
    variants: Sequence[str] = (DEFAULT_VARIANT,),
) -> list[StepResult]:
    """Gate every backend and variant against ``reference``, then time those that agree,
    with the :data:`ANCHORS` beside them.

    All optimizers share one set of parameters and gradients: with a no-op base step a
    full step leaves the parameters bit-identical, and sharing keeps memory to one copy
    of the model, so the backends can be timed interleaved.
    """
    shapes = parameter_shapes(preset)
    gate_shapes = shapes if gate_max_elements is None else subset_within(shapes, gate_max_elements)
    dtype_name = str(dtype).removeprefix("torch.")
    results = []
    for variant in variants:
        adaptive = bool(VARIANTS[variant].get("adaptive", False))
        for backend in ["reference", *[b for b in backend_names if b != "reference"]]:
            result = StepResult(
                preset=preset,
                device=str(device),
                dtype=dtype_name,
                backend=backend,
                tensors=len(shapes),
                numel=numel(shapes),
                variant=variant,
                model_bytes=step_bytes(numel(shapes), dtype, adaptive=adaptive),
            )
            if backend != "reference":
                progress(
                    f"{preset} {dtype_name} {variant}: checking {backend} against reference on "
                    f"{len(gate_shapes)} of {len(shapes)} tensors"
                )
                verdict = _check(gate_shapes, backend, device, dtype, variant)
                result.gate = verdict.detail
                if not verdict:
                    result.status = f"FAILED: {verdict.detail}"
                    progress(f"{preset} {dtype_name} {variant}: {backend} FAILED the check, not timed")
            results.append(result)
            gc.collect()

    params = make_params(shapes, device, dtype, seed=0)
    timed = {_key(r): r for r in results if r.ok}
    phases: dict[str, list[Callable[[], None]]] = {}
    for key, r in timed.items():
        opt = _optimizer(params, r.backend, NoBaseStep, r.variant)
        phases[key] = [opt.first_step, opt.second_step]
    if device.type == "cuda":
        for r in [r for r in timed.values() if r.backend != "reference"]:
            row = StepResult(
                preset, str(device), dtype_name, f"{r.backend}{CAPTURED}", r.tensors, r.numel, r.variant
            )
            row.model_bytes = r.model_bytes
            results.append(row)
            try:
                opt = _optimizer(params, r.backend, NoBaseStep, r.variant)
                replay = captured_step(opt, device)
                twin = _optimizer(params, r.backend, NoBaseStep, r.variant)
                verdict = check_replay(replay, opt, twin, dtype)
            except Exception as exc:  # reported like a failed gate; the eager rows are still timed
                verdict = Verdict(False, f"capture: {type(exc).__name__}: {exc}")
            row.gate = verdict.detail
            if verdict:
                phases[_key(row)] = [replay]
                timed[_key(row)] = row
            else:
                row.status = f"FAILED: {verdict.detail}"
                progress(f"{preset} {dtype_name}: {row.backend} FAILED, not timed")
        gc.collect()  # the twins (an optimizer is freed by the cycle collector), before timing
    element = params[0].element_size()
    for name, (cls, kwargs, elements) in ANCHORS.items():
        anchor = StepResult(preset, str(device), dtype_name, name, len(shapes), numel(shapes), variant="")
        anchor.model_bytes = elements * element * numel(shapes)
        timed[name] = anchor
        phases[name] = [cls(params, **kwargs).step]
        results.append(anchor)
    for key, r in timed.items():  # the first call allocates each backend's state and workspaces
        r.peak_first_call_bytes = peak_memory_bytes(_in_sequence(phases[key]), device)
    progress(f"{preset} {dtype_name}: timing {', '.join(phases)} interleaved")
    timings = time_interleaved(phases, device, budget)
    for key, r in timed.items():
        per_phase, r.total = timings[key]
        if len(per_phase) == 2:
            r.first, r.second = per_phase
        r.peak_steady_bytes = peak_memory_bytes(_in_sequence(phases[key]), device)
    return results


def run_steps(opt: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` whole steps of ``opt`` (``first_step`` then ``second_step``), as eager code runs them."""
    for _ in range(steps):
        opt.first_step()
        opt.second_step()


class CapturedStep:
    """A recorded step, called to replay it. It holds the optimizer too: the graph reads and writes
    the optimizer's buffers (momentum, backup, tables) at every replay, which the graph itself does
    not keep alive, so a replay must not outlive them."""

    def __init__(self, graph: torch.cuda.CUDAGraph, optimizer: torch.optim.Optimizer) -> None:
        self.graph = graph
        self.optimizer = optimizer

    def __call__(self) -> None:
        self.graph.replay()


def captured_step(opt: torch.optim.Optimizer, device: torch.device) -> CapturedStep:
    """``opt``'s whole step (``first_step`` + ``second_step``) recorded in a CUDA graph after
    warm-up steps on a side stream, as README's CUDA graphs section asks of a user; returns the
    replay. Its time against the eager step's is the host work a replay does not repeat."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run_steps(opt, CAPTURE_WARMUP)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_steps(opt, 1)
    return CapturedStep(graph, opt)


def check_replay(
    replay: Callable[[], None], opt: torch.optim.Optimizer, twin: torch.optim.Optimizer, dtype: torch.dtype
) -> Verdict:
    """Does one replay leave ``opt``'s state where one eager step leaves that of ``twin`` (a new
    optimizer on the same tensors, stepped eagerly as often as ``opt`` was before its capture),
    and the parameters as they were (the base step is a no-op)? The gradients are doubled in
    place for that step (and halved back), so the momentum moves: a graph that recorded stale
    addresses, no kernels, or no restore fails this. The parameters are put back whatever
    happens, since every row shares them."""
    run_steps(twin, CAPTURE_WARMUP)
    params = [p for group in opt.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    before = [p.detach().clone() for p in params]
    torch._foreach_mul_(grads, 2.0)
    try:
        run_steps(twin, 1)
        replay()
        restored = all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    finally:
        torch._foreach_mul_(grads, 0.5)
        with torch.no_grad():
            torch._foreach_copy_(params, before)
    if not restored:
        return Verdict(False, "a replay left the parameters changed (a full step restores them)")
    tolerance = tolerances.step(dtype)
    return compare(_state_tensors(opt), _state_tensors(twin), "state after a replay", **tolerance)


def _state_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    state = opt.state_dict()["state"]
    entries = (value for i in sorted(state) for _, value in sorted(state[i].items()))
    return [value for value in entries if isinstance(value, Tensor)]


def _key(result: StepResult) -> str:
    return f"{result.backend}/{result.variant}"


def _in_sequence(phases: Sequence[Callable[[], None]]) -> Callable[[], None]:
    """One call that runs ``phases`` in order (a whole step)."""

    def step() -> None:
        for phase in phases:
            phase()

    return step
