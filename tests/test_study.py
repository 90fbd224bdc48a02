"""fsam-study on a tiny configuration: outputs, the probes' perturbations, reproducibility."""

import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.study import cli, data, recipes, report
from benchmarks.study.train import StudyConfig, run
from fsam_fused import SAM

TINY = StudyConfig(
    seeds=2, epochs=2, hidden=8, rhos=(0.2,), noises=(0.5,), trace_probes=3, density_iterations=6
)


@pytest.fixture(autouse=True)
def one_thread():
    """The study's models are tiny: one thread runs them as fast, and far faster when the
    machine's cores are busy with other work (threads then wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _perturbation_seen_by_last_forward(model, step):
    """Run ``step``; return (weights of the last forward pass) - (weights before the step)."""
    before = _flat(model)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(_flat(module)))
    step()
    return seen[-1] - before


def _net(norm=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), *([nn.BatchNorm1d(7)] if norm else []), nn.Tanh(), nn.Linear(7, 3))


def _batch(samples, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 5, generator=generator), torch.randint(0, 3, (samples,), generator=generator)


def _gradient(model, inputs, targets):
    return torch.cat(
        [
            g.reshape(-1)
            for g in torch.autograd.grad(F.cross_entropy(model(inputs), targets), list(model.parameters()))
        ]
    )


def test_the_study_writes_a_record_a_table_and_two_charts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "QUICK", TINY)
    assert cli.main(["--quick", "--out", str(tmp_path)]) == 0  # --threads 1, as the fixture
    record = json.loads((tmp_path / "study.json").read_text())
    runs = record["runs"]
    expected = {
        (m, n, None if m == "SGD" else 0.2, s) for m in TINY.methods for n in TINY.noises for s in range(2)
    }
    assert {(r["method"], r["noise"], r["rho"], r["seed"]) for r in runs} == expected
    for r in runs:
        assert all(len(curve) == TINY.epochs + 1 for curve in r["curves"].values())
        values = r["sharpness"]["eigenvalues"]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert sum(r["sharpness"]["density_weights"]) == pytest.approx(1.0, abs=1e-3)
    # Every method of one seed and noise level starts from the same weights.
    for noise in TINY.noises:
        for seed in range(2):
            starts = {r["curves"]["train_loss"][0] for r in runs if r["noise"] == noise and r["seed"] == seed}
            assert len(starts) == 1
    table = (tmp_path / "study.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "%" in line]
    # A row per method and setting, then a row per setting comparing F-SAM with SAM.
    settings = len(TINY.noises) * len(TINY.rhos)
    assert len(rows) == settings * (len(TINY.methods) + 1)
    assert table in capsys.readouterr().out
    for name in ("curves.png", "spectra.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_run(method, seed, test_accuracy, eigenvalue):
    return {
        "method": method,
        "noise": 0.4,
        "rho": 0.1,
        "seed": seed,
        "curves": {"train_loss": [2.0, 1.0], "test_accuracy": [0.1, test_accuracy]},
        "final_train_accuracy": 0.7,
        "sharpness": {"eigenvalues": [eigenvalue, 3.0, 2.0, 1.5, 1.0], "trace": 10.0},
    }


def test_the_paired_table_compares_seed_by_seed_and_counts_the_wins():
    runs = [
        _fake_run("SAM", 0, 0.90, 4.0),
        _fake_run("F-SAM", 0, 0.92, 5.0),  # better accuracy, larger lambda_1
        _fake_run("SAM", 1, 0.95, 4.0),
        _fake_run("F-SAM", 1, 0.94, 3.0),  # worse accuracy, smaller lambda_1
    ]
    record = {"config": {"noises": [0.4], "rhos": [0.1]}, "runs": runs}
    (row,) = [line for line in report.paired_markdown(record, "F-SAM", "SAM").splitlines() if "%" in line]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:2] == ["40%", "0.1"]
    assert cells[2] == "+0.0050 ± 0.0212 (1/2)"  # final test acc: +0.02 and -0.01
    assert cells[6] == "+0.000 ± 1.414 (1/2)"  # lambda_1: +1 and -1


def test_a_run_is_reproducible_with_its_seed():
    for method in ("SGD", "F-SAM", "SAM-db"):
        first, again = run(method, 0.5, 0.2, 1, TINY), run(method, 0.5, 0.2, 1, TINY)
        assert first["curves"] == again["curves"] and first["sharpness"] == again["sharpness"]
    other = run("F-SAM", 0.5, 0.2, 0, TINY)
    assert other["curves"] != first["curves"]


@pytest.mark.parametrize("method", ["SAM", "SAM-db", "SAM-full"])
def test_each_recipe_perturbs_along_the_normalised_gradient_of_the_data_it_names(method):
    model = _net()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    batch, other = _batch(6, 3), _batch(8, 4)
    chunks = [_batch(10, 1), _batch(4, 2)]  # unequal: the mean over samples weighs them 10:4
    step, source = {
        "SAM": (lambda: recipes.sam_step(model, F.cross_entropy, optimizer, batch), batch),
        "SAM-db": (lambda: recipes.sam_db_step(model, F.cross_entropy, optimizer, batch, other), other),
        "SAM-full": (
            lambda: recipes.sam_full_step(model, F.cross_entropy, optimizer, batch, chunks),
            tuple(torch.cat(parts) for parts in zip(*chunks)),
        ),
    }[method]
    direction = _gradient(model, *source)
    torch.testing.assert_close(
        _perturbation_seen_by_last_forward(model, step), 0.3 * direction / direction.norm()
    )


@pytest.mark.parametrize("method", ["SGD", "SAM", "SAM-db", "SAM-full"])
def test_running_statistics_move_once_per_step(method):
    model = _net(norm=True)
    batch, other = _batch(6, 3), _batch(6, 4)
    if method == "SGD":
        recipes.sgd_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch)
    else:
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
        step = {
            "SAM": lambda: recipes.sam_step(model, F.cross_entropy, optimizer, batch),
            "SAM-db": lambda: recipes.sam_db_step(model, F.cross_entropy, optimizer, batch, other),
            "SAM-full": lambda: recipes.sam_full_step(
                model, F.cross_entropy, optimizer, batch, [other, batch]
            ),
        }[method]
        step()
    assert model[1].num_batches_tracked.item() == 1


def test_symmetric_label_noise_flips_exactly_the_fraction_to_other_classes():
    labels = torch.arange(1000) % data.CLASSES
    noisy = data.symmetric_label_noise(labels, 0.4, torch.Generator().manual_seed(0))
    flipped = noisy != labels
    assert flipped.sum().item() == 400
    assert set(noisy[flipped].tolist()) == set(range(data.CLASSES))
    assert torch.equal(data.symmetric_label_noise(labels, 0.0, torch.Generator()), labels)
    with pytest.raises(ValueError, match="label noise must be a fraction in"):
        data.symmetric_label_noise(labels, 1.0, torch.Generator())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "SAM,Adam"], "--methods 'SAM,Adam': choose from"),
        (["--noise", "0,x"], "--noise '0,x': give a comma list"),
        (["--noise", "1.5"], "--noise: each fraction must be in"),
        (["--rho", "0"], "--rho: each value must be > 0"),
        (["--seeds", "0"], "--seeds must be a positive integer"),
    ],
)
def test_bad_options_exit_with_a_message_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_mode_changes_only_the_size_of_the_study():
    changed = {
        f.name
        for f in dataclasses.fields(StudyConfig)
        if getattr(cli.QUICK, f.name) != getattr(cli.FULL, f.name)
    }
    assert changed <= {"seeds", "epochs", "rhos", "trace_probes", "density_iterations"}
