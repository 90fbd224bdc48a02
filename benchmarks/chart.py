"""The PNG chart: speedup over reference and bandwidth fraction, per preset and backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .step_bench import DEFAULT_VARIANT, StepResult


def _label(r: StepResult) -> str:
    return r.backend if r.variant == DEFAULT_VARIANT else f"{r.backend} {r.variant}"


def write_chart(path: Path, results: Sequence[StepResult], title: str) -> None:
    """Two bar panels (speedup over ``reference``; fraction of copy bandwidth), grouped by
    preset and dtype, one bar per backend and variant (PyTorch's own optimizers left out)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.total is not None and not r.is_anchor]
    cases = list(dict.fromkeys(f"{r.preset}\n{r.dtype}" for r in timed))
    backends = list(dict.fromkeys(_label(r) for r in timed))
    width = 0.8 / max(len(backends), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(cases) + 2), 7), sharex=True)
    for panel, key, label in (
        (axes[0], "speedup", "speedup over reference (x)"),
        (axes[1], "bandwidth_fraction", "fraction of copy bandwidth"),
    ):
        for j, backend in enumerate(backends):
            values = {
                f"{r.preset}\n{r.dtype}": r.derived.get(key, 0.0) for r in timed if _label(r) == backend
            }
            xs = [i + (j - (len(backends) - 1) / 2) * width for i in range(len(cases))]
            bars = panel.bar(xs, [values.get(c, 0.0) for c in cases], width, label=backend)
            panel.bar_label(bars, fmt="%.2f", fontsize=7)
        panel.set_ylabel(label)
        panel.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(len(cases)), cases)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
