"""The study's outputs: the JSON record, the markdown table and the two PNGs."""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fsam_fused.hessian import SpectralDensity

from .train import METHODS

Run = dict[str, Any]
COLOURS = dict(zip(METHODS, ("tab:grey", "tab:blue", "tab:red", "tab:green", "tab:orange")))


def _rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float cut to ``digits`` significant digits (keeps the JSON small)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(_rounded(record), separators=(",", ":")) + "\n")


def settings(config: dict[str, Any]) -> list[tuple[float, float]]:
    """The (noise, rho) pairs of the study. SGD has no rho and belongs to all."""
    return [(noise, rho) for noise in config["noises"] for rho in config["rhos"]]


def runs_of(runs: Sequence[Run], noise: float, rho: float, method: str) -> list[Run]:
    return [r for r in runs if r["noise"] == noise and r["method"] == method and r["rho"] in (rho, None)]


def early_epoch(runs: Sequence[Run]) -> int:
    """The epoch at which the table reads the training loss to compare early progress."""
    return max(1, (len(runs[0]["curves"]["train_loss"]) - 1) // 10)


def _metrics(run: Run, early: int) -> dict[str, tuple[float, int]]:
    """Each table metric of ``run``: its value, and which way is better (+1 higher, -1
    lower, 0 neither: with label noise a higher training accuracy is memorised noise)."""
    curves, sharp = run["curves"], run["sharpness"]
    return {
        "final test acc": (curves["test_accuracy"][-1], 1),
        "peak test acc": (max(curves["test_accuracy"]), 1),
        f"train loss, epoch {early}": (curves["train_loss"][early], -1),
        "final train loss": (curves["train_loss"][-1], -1),
        "final train acc": (run["final_train_accuracy"], 0),
        "lambda_1": (sharp["eigenvalues"][0], -1),
        "lambda_1/lambda_5": (sharp["eigenvalues"][0] / sharp["eigenvalues"][4], -1),
        "trace": (sharp["trace"], -1),
    }


def _decimals(value: float) -> int:
    """Decimals that show ``value`` to four significant digits."""
    return max(0, 3 - math.floor(math.log10(abs(value)))) if value else 4


def _mean_std(values: Sequence[float], decimals: int, signed: bool = False) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    sign = "+" if signed else ""
    return f"{statistics.mean(values):{sign}.{decimals}f} ± {spread:.{decimals}f}"


def markdown(record: dict[str, Any]) -> str:
    """One table row per (noise, rho, method): mean ± standard deviation over seeds."""
    runs = record["runs"]
    config = record["config"]
    early = early_epoch(runs)
    names = list(_metrics(runs[0], early))
    lines = [
        f"| noise | rho | method | {' | '.join(names)} |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for noise, rho in settings(config):
        for method in config["methods"]:
            chosen = runs_of(runs, noise, rho, method)
            if not chosen:
                continue
            per_seed = [_metrics(r, early) for r in chosen]
            cells = []
            for name in names:
                values = [m[name][0] for m in per_seed]
                cells.append(_mean_std(values, _decimals(statistics.mean(values))))
            lines.append(f"| {noise:.0%} | {rho:g} | {method} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def paired_markdown(record: dict[str, Any], method: str, baseline: str) -> str:
    """``method`` minus ``baseline`` seed by seed (both saw the same data, initial weights
    and batches): the mean ± standard deviation of the differences, and in how many seeds
    ``method`` came out better."""
    runs, config = record["runs"], record["config"]
    early = early_epoch(runs)
    names = [name for name, (_, better) in _metrics(runs[0], early).items() if better]
    lines = [
        f"| noise | rho | {' | '.join(names)} |",
        "|---|---|" + "---|" * len(names),
    ]
    for noise, rho in settings(config):
        ours = {r["seed"]: _metrics(r, early) for r in runs_of(runs, noise, rho, method)}
        theirs = {r["seed"]: _metrics(r, early) for r in runs_of(runs, noise, rho, baseline)}
        seeds = sorted(ours.keys() & theirs.keys())
        if not seeds:
            continue
        cells = []
        for name in names:
            differences = [ours[s][name][0] - theirs[s][name][0] for s in seeds]
            better = sum(d * ours[seeds[0]][name][1] > 0 for d in differences)
            decimals = _decimals(statistics.mean(theirs[s][name][0] for s in seeds))
            cells.append(f"{_mean_std(differences, decimals, signed=True)} ({better}/{len(seeds)})")
        lines.append(f"| {noise:.0%} | {rho:g} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def report_markdown(record: dict[str, Any]) -> str:
    """The study's markdown: the table over all methods, then F-SAM against SAM seed by seed."""
    config = record["config"]
    seeds = config["seeds"]
    text = (
        f"Digits MLP 64-{config['hidden']}-10, {config['epochs']} epochs, {seeds} seeds: mean ± "
        "standard deviation over seeds. Training metrics use the labels as trained (noisy ones "
        "included); the Hessian is that of the training loss at the end of training.\n\n"
    ) + markdown(record)
    if "F-SAM" in config["methods"] and "SAM" in config["methods"]:
        text += (
            "\nF-SAM minus SAM, paired by seed (same data, initial weights and batches): mean ± "
            f"standard deviation of the {seeds} differences, and (in parentheses) the seeds in "
            "which F-SAM is better (higher accuracy; lower loss, eigenvalues and trace).\n\n"
        ) + paired_markdown(record, "F-SAM", "SAM")
    return text


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    return plt


def _grid(plt: Any, rows: int, title: str) -> tuple[Any, Any]:
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.2 * rows), squeeze=False)
    fig.suptitle(title, fontsize=10)
    return fig, axes


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Write the figure as a 64-colour PNG: a quarter of the size of a full-colour one."""
    from PIL import Image  # a dependency of matplotlib

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    image = Image.open(buffer).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)


def plot_curves(path: Path, record: dict[str, Any]) -> None:
    """Training loss and test accuracy per epoch: the mean over seeds, shaded from the
    lowest to the highest seed."""
    plt = _pyplot()
    runs, methods = record["runs"], record["config"]["methods"]
    pairs = settings(record["config"])
    seeds = record["config"]["seeds"]
    title = f"digits MLP, {seeds} seed{'s' * (seeds > 1)}: mean, lowest to highest seed shaded"
    fig, axes = _grid(plt, len(pairs), title)
    for (noise, rho), row in zip(pairs, axes):
        for key, axis, label in (
            ("train_loss", row[0], "training loss (labels as trained)"),
            ("test_accuracy", row[1], "test accuracy"),
        ):
            for method in methods:
                chosen = runs_of(runs, noise, rho, method)
                if not chosen:
                    continue
                values = torch.tensor([r["curves"][key] for r in chosen])
                epochs = range(values.shape[1])
                axis.plot(epochs, values.mean(0), color=COLOURS[method], label=method, linewidth=1.2)
                axis.fill_between(
                    epochs, values.min(0).values, values.max(0).values, color=COLOURS[method], alpha=0.2
                )
            axis.set_title(f"noise {noise:.0%}, rho {rho:g}: {label}", fontsize=9)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        row[0].set_yscale("log")
        # From the early epoch on: the differences at the end are a few percent.
        early = early_epoch(runs)
        row[1].set_ylim(min(r["curves"]["test_accuracy"][early] for r in runs) - 0.02, 1.0)
        row[1].legend(fontsize=7)
    _save(plt, fig, path)


def plot_spectra(path: Path, record: dict[str, Any]) -> None:
    """Per setting: the Hessian's eigenvalue density at the end of training (stochastic
    Lanczos quadrature, averaged over seeds, Gaussian-smoothed) and the top eigenvalues."""
    plt = _pyplot()
    runs, methods = record["runs"], record["config"]["methods"]
    pairs = settings(record["config"])
    fig, axes = _grid(plt, len(pairs), "Hessian of the training loss at the end of training")
    for (noise, rho), row in zip(pairs, axes):
        chosen = {m: runs_of(runs, noise, rho, m) for m in methods if runs_of(runs, noise, rho, m)}
        nodes = [x for rs in chosen.values() for r in rs for x in r["sharpness"]["density_nodes"]]
        grid = torch.linspace(min(nodes), max(nodes), 300, dtype=torch.float64)
        width = (max(nodes) - min(nodes)) / 80
        for index, (method, rs) in enumerate(chosen.items()):
            density = SpectralDensity(
                torch.tensor([r["sharpness"]["density_nodes"] for r in rs], dtype=torch.float64),
                torch.tensor([r["sharpness"]["density_weights"] for r in rs], dtype=torch.float64),
                products=0,
            )
            row[0].plot(
                grid, density.evaluate(grid, width) + 1e-8, color=COLOURS[method], label=method, linewidth=1
            )
            top = torch.tensor([r["sharpness"]["eigenvalues"] for r in rs])
            ks = torch.arange(1, top.shape[1] + 1) + (index - len(chosen) / 2) * 0.08
            row[1].errorbar(
                ks,
                top.mean(0),
                yerr=[top.mean(0) - top.min(0).values, top.max(0).values - top.mean(0)],
                fmt="o",
                color=COLOURS[method],
                label=method,
                markersize=3,
                capsize=2,
            )
        row[0].set_yscale("log")
        row[0].set_ylim(bottom=1e-6)
        row[0].set_title(f"noise {noise:.0%}, rho {rho:g}: eigenvalue density", fontsize=9)
        row[0].set_xlabel("eigenvalue")
        row[1].set_title(f"noise {noise:.0%}, rho {rho:g}: top eigenvalues (mean, min-max)", fontsize=9)
        row[1].set_xlabel("k")
        row[1].legend(fontsize=7)
        for axis in row:
            axis.grid(alpha=0.3)
    _save(plt, fig, path)
