"""FriendlySAM under torch.distributed, against single-process runs of the same training.

Two processes are spawned once per backend (gloo on the CPU; NCCL on two GPUs, marked
``gpu``) and run every scenario; each rank saves what it saw after every step, and the
tests compare that with runs in this process:

* DDP, synchronised perturbation: equals one process on the concatenated batch.
* DDP, per-worker perturbation: each rank equals a simulated worker that perturbs with
  its own half of the batch and its own momentum, the second gradients averaged.
* FSDP2 ``fully_shard`` (DTensor parameters, uneven and empty shards): equals the
  unsharded run; this only holds if the squared norm is summed over the shards.
* Plain-tensor shards with an explicit ``process_group``: the perturbed and the updated
  parameters, put back together, equal the unsharded ones.
* Gradient accumulation (``accumulated_step``, two micro-batches per rank) in each DDP mode
  and under FSDP2: the same results as without it, and DDP all-reduces once per synced pass
  (counted by a communication hook), not once per micro-batch.

Ranks talk over loopback only (a file store and gloo bound to the loopback interface),
and the spawn is killed if it outlives its deadline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from fsam_fused import FriendlySAM, accumulated_step, testing
from fsam_fused.distributed import first_pass, is_dtensor

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
MICRO_BATCHES = 2  # per rank and step, in the accumulation scenarios
SPAWN_DEADLINE_S = 120
# Shapes for the hand-sharded case, split along dim 0: odd sizes give uneven parts, and a
# single row leaves the second rank an empty part.
MANUAL_SHAPES = ((11,), (7, 3), (1,), (4, 2, 2))
SCENARIOS = (
    "ddp_sync",
    "ddp_per_worker",
    "ddp_per_worker_nonfinite",
    "fsdp2",
    "mixed_sharding",
    "explicit_group",
    "ddp_sync_accumulated",
    "ddp_per_worker_accumulated",
    "fsdp2_accumulated",
)
NONFINITE_STEP, NONFINITE_RANK = 1, 1


# ------------------------------------------------------------------ shared training code
def _model() -> nn.Module:
    torch.manual_seed(0)
    # The last layer has one output, so FSDP2 leaves rank 1 an empty shard of its bias.
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 1))


def _batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g))
        for _ in range(STEPS)
    ]


def _part(t: Tensor, rank: int) -> Tensor:
    return t.tensor_split(WORLD)[rank]


def _optimizer(params: list[Tensor], **kwargs) -> FriendlySAM:
    """Two groups, one adaptive, with a large rho so that a wrong norm shows."""
    groups = [dict(params=params[:2], adaptive=True, rho=0.4), dict(params=params[2:])]
    return FriendlySAM(groups, torch.optim.SGD, rho=0.3, sigma=1.0, lmbda=0.6, lr=0.1, momentum=0.9, **kwargs)


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(x), y)


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().clone()


def _snapshot(params: list[Tensor], opt: FriendlySAM) -> dict[str, list[Tensor]]:
    return {
        "params": [_full(p) for p in params],
        "momentum": [_full(opt.state[p]["momentum"]) for p in params],
    }


def _train(
    model: nn.Module,
    batches,
    first_pass_context,
    device: torch.device,
    poison_step: int | None = None,
    **kwargs,
) -> list[dict]:
    """F-SAM steps; at ``poison_step`` one first-pass gradient element is set to Inf."""
    params = list(model.parameters())
    opt = _optimizer(params, **kwargs)
    trace = []
    for step, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        with first_pass_context():
            _loss(model, x, y).backward()
        if step == poison_step:
            params[0].grad.view(-1)[0] = float("inf")
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
        trace.append(dict(skipped=torch.tensor(opt.skipped_steps), **_snapshot(params, opt)))
    return trace


def _train_accumulated(
    model: nn.Module, batches, device: torch.device, mode: str = "sync", reductions: list[int] | None = None
) -> list[dict]:
    """F-SAM steps through ``accumulated_step``, each batch split into ``MICRO_BATCHES``.

    ``reductions``: a counter from :func:`_counting_reductions`, recorded after every step.
    """
    params = list(model.parameters())
    opt = _optimizer(params)
    trace = []
    for x, y in batches:
        micro = list(zip(x.to(device).tensor_split(MICRO_BATCHES), y.to(device).tensor_split(MICRO_BATCHES)))
        accumulated_step(opt, model, micro, lambda b: _loss(model, *b), mode=mode)
        counted = {} if reductions is None else dict(reductions=torch.tensor(reductions[0]))
        trace.append(dict(skipped=torch.tensor(opt.skipped_steps), **counted, **_snapshot(params, opt)))
    return trace


def _counting_reductions(model: nn.Module) -> list[int]:
    """Make DDP count its bucket all-reduces in the returned one-element list."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = [0]

    # No annotations: DDP checks them against dist.GradBucket, and this module's are strings.
    def hook(counter, bucket):
        counter[0] += 1
        return allreduce_hook(None, bucket)

    model.register_comm_hook(calls, hook)
    return calls


def _manual_params() -> list[Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=g) for s in MANUAL_SHAPES]


def _manual_grads() -> list[tuple[list[Tensor], list[Tensor]]]:
    """Per step: the global first and second gradients of the hand-sharded tensors."""
    g = torch.Generator().manual_seed(2)

    def draw() -> list[Tensor]:
        return [torch.randn(s, generator=g) for s in MANUAL_SHAPES]

    return [(draw(), draw()) for _ in range(STEPS)]


def _train_manual(params: list[Tensor], grads, part, **kwargs) -> list[dict]:
    """Set given gradients instead of running a model; record perturbed and updated values."""
    opt = _optimizer(params, **kwargs)
    trace = []
    for first, second in grads:
        for p, g in zip(params, first, strict=True):
            p.grad = part(g).to(p.device)
        opt.first_step(zero_grad=True)
        perturbed = [_full(p) for p in params]
        for p, g in zip(params, second, strict=True):
            p.grad = part(g).to(p.device)
        opt.second_step(zero_grad=True)
        trace.append(dict(perturbed=perturbed, **_snapshot(params, opt)))
    return trace


# ---------------------------------------------------------------------- worker process
def _run_scenario(name: str, rank: int, device: torch.device) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = [(_part(x, rank), _part(y, rank)) for x, y in _batches()]
    device_ids = [device.index] if device.type == "cuda" else None
    if name in ("ddp_sync", "ddp_per_worker"):
        model = DDP(_model().to(device), device_ids=device_ids)
        mode = name.removeprefix("ddp_")
        return _train(model, batches, lambda: first_pass(model, mode), device)
    if name == "ddp_per_worker_nonfinite":
        model = DDP(_model().to(device), device_ids=device_ids)
        poison = NONFINITE_STEP if rank == NONFINITE_RANK else None
        context = functools.partial(first_pass, model, "per_worker")
        return _train(model, batches, context, device, poison, replica_group=dist.group.WORLD)
    if name == "fsdp2":
        model = _model().to(device)
        fully_shard(model, mesh=init_device_mesh(device.type, (WORLD,)))
        assert all(is_dtensor(p) for p in model.parameters())
        return _train(model, batches, contextlib.nullcontext, device)
    if name in ("ddp_sync_accumulated", "ddp_per_worker_accumulated"):
        model = DDP(_model().to(device), device_ids=device_ids)
        mode = name.removeprefix("ddp_").removesuffix("_accumulated")
        return _train_accumulated(model, batches, device, mode, _counting_reductions(model))
    if name == "fsdp2_accumulated":
        model = _model().to(device)
        fully_shard(model, mesh=init_device_mesh(device.type, (WORLD,)))
        return _train_accumulated(model, batches, device)
    if name == "mixed_sharding":
        model = _model().to(device)
        fully_shard(model, mesh=init_device_mesh(device.type, (WORLD,)))
        whole = torch.ones(3, device=device, requires_grad=True)
        opt = _optimizer([*model.parameters(), whole])
        _loss(model, *(t.to(device) for t in batches[0])).backward()
        whole.grad = torch.ones_like(whole)
        try:
            opt.first_step()
        except ValueError as error:
            return [dict(error=str(error))]
        return []
    assert name == "explicit_group", name
    local = [_part(t, rank).clone().to(device).requires_grad_() for t in _manual_params()]
    return _train_manual(local, _manual_grads(), lambda t: _part(t, rank), process_group=dist.group.WORLD)


def _loopback_interface() -> str | None:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def _worker(rank: int, backend: str, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    interface = _loopback_interface()
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {name: _run_scenario(name, rank, device) for name in SCENARIOS}
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _spawn(backend: str, tmp: Path) -> list[dict]:
    """Run every scenario on ``WORLD`` spawned ranks; their results, by rank."""
    context = mp.start_processes(
        _worker, args=(backend, str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(
    scope="module",
    params=[
        "gloo",
        pytest.param(
            "nccl",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} GPUs"),
            ],
        ),
    ],
)
def ranks(request, tmp_path_factory) -> list[dict]:
    return _spawn(request.param, tmp_path_factory.mktemp(request.param))


# -------------------------------------------------------------------------- the checks
def _assert_trace_close(actual: list[dict], expected: list[dict], what: str) -> None:
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        for key in want:
            values = zip(*(v if isinstance(v, list) else [v] for v in (got[key], want[key])), strict=True)
            for i, (a, b) in enumerate(values):
                where = f"{what}: step {step} {key}[{i}]"
                torch.testing.assert_close(
                    a, b, **testing.step(torch.float32), msg=lambda m, where=where: f"{where}: {m}"
                )


def _assert_params_identical_across_ranks(ranks: list[dict], scenario: str) -> None:
    for step in range(STEPS):
        reference = ranks[0][scenario][step]["params"]
        for rank in range(1, WORLD):
            params = ranks[rank][scenario][step]["params"]
            for i, (a, b) in enumerate(zip(params, reference, strict=True)):
                assert torch.equal(a, b), f"{scenario}: step {step}: rank {rank} param {i} != rank 0"


def _single_process_full_batch() -> list[dict]:
    return _train(_model(), _batches(), contextlib.nullcontext, torch.device("cpu"))


def test_ddp_sync_mode_equals_one_process_on_the_whole_batch(ranks):
    expected = _single_process_full_batch()
    for rank, result in enumerate(ranks):
        _assert_trace_close(result["ddp_sync"], expected, f"ddp_sync rank {rank}")
    _assert_params_identical_across_ranks(ranks, "ddp_sync")


def _simulated_workers() -> list[list[dict]]:
    """Per-worker F-SAM in one process: own batch half, own norm and momentum, averaged second grads."""
    models = [_model() for _ in range(WORLD)]
    params = [list(m.parameters()) for m in models]
    opts = [_optimizer(p) for p in params]
    traces: list[list[dict]] = [[] for _ in range(WORLD)]
    for x, y in _batches():
        for rank in range(WORLD):
            _loss(models[rank], _part(x, rank), _part(y, rank)).backward()
            opts[rank].first_step(zero_grad=True)
            _loss(models[rank], _part(x, rank), _part(y, rank)).backward()
        for same_param in zip(*params, strict=True):
            mean = torch.stack([p.grad for p in same_param]).mean(0)
            for p in same_param:
                p.grad = mean.clone()
        for rank in range(WORLD):
            opts[rank].second_step(zero_grad=True)
            traces[rank].append(_snapshot(params[rank], opts[rank]))
    return traces


def test_ddp_per_worker_mode_perturbs_each_rank_with_its_own_gradient(ranks):
    expected = _simulated_workers()
    for rank, result in enumerate(ranks):
        _assert_trace_close(result["ddp_per_worker"], expected[rank], f"ddp_per_worker rank {rank}")
    _assert_params_identical_across_ranks(ranks, "ddp_per_worker")
    last = [r["ddp_per_worker"][-1]["momentum"] for r in ranks]
    assert not all(torch.allclose(a, b) for a, b in zip(*last, strict=True)), (
        "per-worker momentum should follow each rank's own gradients, yet the ranks agree"
    )


def test_fsdp2_sharded_parameters_equal_the_unsharded_run(ranks):
    expected = _single_process_full_batch()
    for rank, result in enumerate(ranks):
        _assert_trace_close(result["fsdp2"], expected, f"fsdp2 rank {rank}")


# The test model's parameters fit in one DDP bucket, so one synced backward is one all-reduce.
@pytest.mark.parametrize(("mode", "synced_passes"), [("sync", 2), ("per_worker", 1)])
def test_ddp_accumulation_equals_the_unaccumulated_step_and_reduces_once_per_synced_pass(
    ranks, mode, synced_passes
):
    expected = _single_process_full_batch() if mode == "sync" else None
    simulated = _simulated_workers() if mode == "per_worker" else None
    for rank, result in enumerate(ranks):
        trace = result[f"ddp_{mode}_accumulated"]
        _assert_trace_close(trace, expected or simulated[rank], f"ddp_{mode}_accumulated rank {rank}")
        reductions = [int(step["reductions"]) for step in trace]
        assert reductions == [synced_passes * (s + 1) for s in range(STEPS)], (
            f"rank {rank}: all-reduces after each step {reductions}, expected {synced_passes} per step"
        )
    _assert_params_identical_across_ranks(ranks, f"ddp_{mode}_accumulated")


def test_fsdp2_accumulation_equals_the_unsharded_run(ranks):
    expected = _single_process_full_batch()
    for rank, result in enumerate(ranks):
        _assert_trace_close(result["fsdp2_accumulated"], expected, f"fsdp2_accumulated rank {rank}")


def test_explicit_process_group_sums_the_norm_over_plain_tensor_shards(ranks):
    full = [t.clone().requires_grad_() for t in _manual_params()]
    expected = _train_manual(full, _manual_grads(), lambda t: t)

    def gather(step: int, key: str) -> list[Tensor]:
        per_rank = [r["explicit_group"][step][key] for r in ranks]
        return [torch.cat(parts) for parts in zip(*per_rank, strict=True)]

    gathered = [{key: gather(step, key) for key in expected[step]} for step in range(STEPS)]
    _assert_trace_close(gathered, expected, "explicit_group")


def test_ddp_per_worker_ranks_skip_a_nonfinite_step_together(ranks):
    """An Inf in one rank's first gradient skips the step on every rank (replica_group)."""
    for rank, result in enumerate(ranks):
        trace = result["ddp_per_worker_nonfinite"]
        skipped = [int(s["skipped"]) for s in trace]
        assert skipped == [0, 1, 1], f"rank {rank}: skipped_steps after each step {skipped}"
        for i, (before, after) in enumerate(
            zip(trace[NONFINITE_STEP - 1]["params"], trace[NONFINITE_STEP]["params"], strict=True)
        ):
            assert torch.equal(before, after), f"rank {rank}: param {i} changed in the skipped step"
    _assert_params_identical_across_ranks(ranks, "ddp_per_worker_nonfinite")


def test_mixing_sharded_and_whole_parameters_is_refused(ranks):
    for rank, result in enumerate(ranks):
        outcome = result["mixed_sharding"]
        assert outcome, f"rank {rank}: first_step accepted DTensor and plain parameters in one optimizer"
        assert "sharded over different process groups" in outcome[0]["error"]


def test_first_pass_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        with first_pass(nn.Linear(2, 2), mode="async"):
            pass


def test_first_pass_per_worker_needs_a_model_with_no_sync():
    with pytest.raises(TypeError, match="wrap the model in DDP"):
        with first_pass(nn.Linear(2, 2), mode="per_worker"):
            pass


@pytest.mark.parametrize("argument", ["process_group", "replica_group"])
def test_group_arguments_must_be_process_groups(argument):
    with pytest.raises(TypeError, match=f"{argument} must be a torch.distributed.ProcessGroup"):
        FriendlySAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **{argument: "world"})


def test_without_process_groups_the_norm_is_left_alone():
    """Single-process training never touches torch.distributed (no init needed)."""
    model = nn.Linear(3, 2)
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.first_step(zero_grad=True)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.second_step()
    assert not dist.is_initialized()
