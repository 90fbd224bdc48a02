"""fsam-bench end to end on a small preset: arguments, outputs, and the correctness gate."""

import contextlib
import gc
import json
import weakref

import pytest
import torch
from torch import nn

import fsam_fused
from benchmarks import cli, presets, profile_step, step_bench
from benchmarks.digits import check_agreement
from fsam_fused import FriendlySAM
from fsam_fused.backends import foreach


class _SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(40, 7), nn.LayerNorm(7))


@pytest.fixture
def small_preset(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "small", presets.Preset("small", "test net", _SmallNet))
    return "small"


@pytest.fixture
def broken_torch_backend(monkeypatch):
    """The torch backend with restore_ forgotten: parameters stay perturbed."""
    monkeypatch.setattr(foreach, "restore_", lambda plan: None)


def _run(capsys, *argv):
    status = cli.main(["--device", "cpu", "--quick", *argv])
    return status, capsys.readouterr()


def test_step_benchmark_writes_table_json_and_png(small_preset, tmp_path, capsys):
    json_path, png_path = tmp_path / "r.json", tmp_path / "r.png"
    status, out = _run(
        capsys,
        "--preset",
        small_preset,
        "--no-train-check",
        "--backends",
        "torch",
        "--dtype",
        "fp32,bf16",
        "--json",
        str(json_path),
        "--png",
        str(png_path),
    )
    assert status == 0
    assert "all backends agree with reference" in out.out
    record = json.loads(json_path.read_text())
    rows = {(r["dtype"], r["backend"]): r for r in record["step"]}
    anchors = ("torch SGD foreach", "torch AdamW fused", "torch no-op step")
    assert set(rows) == {(d, b) for d in ("float32", "bfloat16") for b in ("reference", "torch", *anchors)}
    for d in ("float32", "bfloat16"):  # PyTorch's own optimizers, timed beside ours on the same tensors
        assert all(
            rows[d, a]["total_ms"]["median"] > 0 and rows[d, a]["host_us_per_tensor"] >= 0 for a in anchors
        )
    torch_fp32 = rows["float32", "torch"]
    assert torch_fp32["status"] == "ok" and torch_fp32["total_ms"]["median"] > 0
    assert torch_fp32["speedup"] > 0 and 0 < torch_fp32["bandwidth_fraction"]
    assert torch_fp32["model_bytes"] == 40 * torch_fp32["numel"]
    assert record["machine"]["torch"] == torch.__version__ and record["copy_bandwidth_gbs"] > 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_on_cuda_every_backend_is_also_timed_replaying_a_captured_graph(small_preset, tmp_path, capsys):
    json_path = tmp_path / "r.json"
    argv = ["--device", "cuda", "--quick", "--preset", small_preset, "--no-train-check"]
    assert cli.main([*argv, "--json", str(json_path)]) == 0, capsys.readouterr().out
    rows = {r["backend"]: r for r in json.loads(json_path.read_text())["step"]}
    for backend in cli.runnable_backends(torch.device("cuda")):
        captured = rows[f"{backend} graph"]
        assert captured["status"] == "ok" and captured["total_ms"]["median"] > 0
        assert captured["peak_steady_bytes"] == 0  # a replay allocates nothing
    assert "reference graph" not in rows


@pytest.mark.parametrize("replay", ["step", "nothing", "no_restore"])
def test_a_replay_is_checked_against_one_more_eager_step(replay):
    shapes = [(4, 3), (5,)]
    params = step_bench.make_params(shapes, torch.device("cpu"), torch.float32, seed=0)

    def optimizer():
        return FriendlySAM(params, step_bench.NoBaseStep, backend="torch", **step_bench.FSAM_KWARGS)

    opt, twin = optimizer(), optimizer()
    step_bench.run_steps(opt, step_bench.CAPTURE_WARMUP)  # what captured_step runs before it records

    before = [p.detach().clone() for p in params]

    def stand_in():  # for graph.replay: the recorded step, a graph that recorded nothing, or half
        if replay != "nothing":
            opt.first_step()
        if replay == "step":
            opt.second_step()
        if replay == "no_restore":
            opt._pending.finish()

    verdict = step_bench.check_replay(stand_in, opt, twin, torch.float32)
    assert bool(verdict) == (replay == "step"), verdict.detail
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # whatever the replay did


def test_profile_prints_each_backends_host_time_by_call(small_preset, tmp_path, capsys):
    json_path = tmp_path / "r.json"
    argv = ["--preset", small_preset, "--no-train-check", "--backends", "torch", "--profile"]
    status, out = _run(capsys, *argv, "--json", str(json_path))
    assert status == 0
    assert f"{small_preset} float32 torch: host time by call over" in out.out
    assert "Self CPU" in out.out and "aten::" in out.out  # the profiler's table, with the ops it saw
    assert "host time by call" in json.loads(json_path.read_text())["profile"]


def test_a_profiler_that_fails_costs_only_the_profile(small_preset, monkeypatch, tmp_path, capsys):
    def broken(*args):
        raise RuntimeError("CUPTI is not available")

    monkeypatch.setattr("benchmarks.runner.profile_tables", broken)
    json_path = tmp_path / "r.json"
    argv = ["--preset", small_preset, "--no-train-check", "--backends", "torch", "--profile"]
    status, out = _run(capsys, *argv, "--json", str(json_path))
    assert status == 0
    assert "--profile failed: RuntimeError: CUPTI is not available" in out.out
    assert "all backends agree with reference" in out.out
    record = json.loads(json_path.read_text())
    assert record["step"] and record["profile"].startswith("--profile failed")


def test_a_backend_that_fails_to_profile_costs_only_its_own_table(small_preset, monkeypatch):
    monkeypatch.setattr(profile_step, "FriendlySAM", _fails_for_torch_backend)
    text = profile_step.profile_tables(small_preset, ["native", "torch"], torch.device("cpu"), torch.float32)
    assert f"{small_preset} float32 torch: host time by call over 10 steps: failed: RuntimeError" in text
    assert f"{small_preset} float32 native: host time by call over 10 steps\n" in text


def _fails_for_torch_backend(params, base, backend, **kwargs):
    if backend == "torch":
        raise RuntimeError("this backend cannot run here")
    return FriendlySAM(params, base, backend=backend, **kwargs)


@pytest.mark.gpu
def test_on_cuda_the_profile_has_the_device_time(small_preset):
    backends = cli.runnable_backends(torch.device("cuda"))
    text = profile_step.profile_tables(small_preset, backends, torch.device("cuda"), torch.float32)
    tables = text.split(": host time by call over")[1:]
    assert len(tables) == len(backends) and "failed" not in text
    assert all("CUDA" in table for table in tables)  # the device-time columns, whatever their exact names


def test_backend_that_disagrees_is_failed_not_timed_and_exit_status_is_1(
    small_preset, broken_torch_backend, capsys
):
    status, out = _run(capsys, "--preset", small_preset, "--no-train-check", "--backends", "torch")
    assert status == 1
    assert "FAILED" in out.out and "DISAGREEMENT" in out.out


def test_digits_training_agrees_and_catches_a_broken_backend(monkeypatch):
    _, verdicts = check_agreement(["torch"], torch.device("cpu"), progress=lambda _: None, steps=4)
    assert verdicts["torch"]
    monkeypatch.setattr(foreach, "restore_", lambda plan: None)
    _, verdicts = check_agreement(["torch"], torch.device("cpu"), progress=lambda _: None, steps=4)
    assert not verdicts["torch"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "resnet50"], "is not a preset"),
        (["--dtype", "fp64"], "--dtype 'fp64'"),
        (["--backends", "fastest"], "'fastest' is not a backend"),
        (["--device", "warp"], "is not a device"),
        (["--e2e-batch", "0"], "--e2e-batch must be a positive integer"),
    ],
)
def test_bad_arguments_exit_2_naming_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_default_backends_are_the_available_ones_that_run_here():
    names = cli.runnable_backends(torch.device("cpu"))
    assert "torch" in names and "reference" not in names
    assert set(names) <= set(fsam_fused.available_backends())


def test_results_dir_gets_json_png_and_tables_named_by_machine_and_date(small_preset, tmp_path, capsys):
    status, out = _run(capsys, "--preset", small_preset, "--no-train-check", "--results-dir", str(tmp_path))
    assert status == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "png", "txt"]
    assert len({f.rsplit(".", 1)[0] for f in files}) == 1 and files[0].startswith("cpu-")
    assert out.out in (tmp_path / files[2]).read_text()


def test_variants_are_gated_and_timed_and_a_host_table_is_printed(small_preset, capsys, monkeypatch):
    monkeypatch.setattr("benchmarks.report.HOST_OVERHEAD_PRESET", small_preset)
    status, out = _run(
        capsys, "--preset", small_preset, "--no-train-check", "--backends", "torch", "--variant", "all"
    )
    assert status == 0
    step_rows = [line.split() for line in out.out.splitlines() if line.startswith(small_preset)]
    timed = {(row[2], row[3]) for row in step_rows}
    variants = ("fsam", "fisher", "asam", "asam_eta")
    assert {("torch", v) for v in variants} <= timed
    assert {("reference", v) for v in variants} <= timed
    assert "host us/tensor" in out.out


def test_unknown_variant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(capsys, "--variant", "sharpest")
    assert exit_info.value.code == 2
    assert "--variant" in capsys.readouterr().err


def test_a_captured_step_keeps_its_optimizer_alive_while_it_can_be_replayed(monkeypatch):
    # The graph reads and writes the optimizer's buffers at each replay; the bench keeps only the
    # replay of each row, so the replay must hold the optimizer. (CUDA faked: only ownership is checked.)
    class FakeStream:
        def wait_stream(self, other):
            pass

    class FakeGraph:
        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    params = step_bench.make_params([(4, 3), (5,)], torch.device("cpu"), torch.float32, seed=0)
    opt = FriendlySAM(params, step_bench.NoBaseStep, backend="torch", **step_bench.FSAM_KWARGS)
    alive = weakref.ref(opt)
    replay = step_bench.captured_step(opt, torch.device("cpu"))
    del opt
    gc.collect()
    assert alive() is not None
    replay()
    del replay
    gc.collect()
    assert alive() is None
