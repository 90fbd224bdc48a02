"""``fsam-study``: SGD, SAM, F-SAM and the perturbation probes SAM-db and SAM-full on
scikit-learn's digits, with optional symmetric label noise: training curves and the Hessian
spectrum at the end of training (the F-SAM paper's appendices A5-A7, in the small).

Writes into ``--out``: ``study.json`` (settings, machine, every run's per-epoch curves and
Hessian measurements), ``study.md`` (a table: mean ± std over seeds), ``curves.png`` and
``spectra.png``. ``--quick`` is a smoke run of a couple of minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .. import machine
from ..cli import Progress
from . import report
from .train import METHODS, StudyConfig, run

FULL = StudyConfig()
QUICK = dataclasses.replace(FULL, seeds=2, epochs=10, rhos=(0.1,), trace_probes=10, density_iterations=20)


def plan(config: StudyConfig) -> Iterator[tuple[str, float, float | None, int]]:
    """(method, noise, rho, seed) of every run. SGD has no rho: it runs once per noise and
    seed, and the report sets it beside every rho."""
    for noise in config.noises:
        for seed in range(config.seeds):
            if "SGD" in config.methods:
                yield "SGD", noise, None, seed
            for rho in config.rhos:
                for method in config.methods:
                    if method != "SGD":
                        yield method, noise, rho, seed


def _listed(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(item) for item in text.split(",") if item.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsam-study",
        description=__doc__.split("\n\n")[0].removeprefix("``fsam-study``: "),
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 seeds, 10 epochs, rho 0.1, fewer Hessian products"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("study-results"),
        help="folder for the results (default study-results)",
    )
    parser.add_argument("--methods", default=None, help=f"comma list from {','.join(METHODS)} (default: all)")
    parser.add_argument(
        "--noise", default=None, help=f"comma list of label-noise fractions (default {_listed(FULL.noises)})"
    )
    parser.add_argument(
        "--rho", default=None, help=f"comma list of rho values (default {_listed(FULL.rhos)})"
    )
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {FULL.seeds})")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (default {FULL.epochs})")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is small; on a busy machine one thread is far faster)",
    )
    return parser


def config_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> StudyConfig:
    """The chosen preset with the options given on the command line; usage errors exit 2."""
    changes: dict = {}
    if args.methods is not None:
        changes["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in changes["methods"] if m not in METHODS]
        if unknown or not changes["methods"]:
            parser.error(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    for option, key in (("noise", "noises"), ("rho", "rhos")):
        text = getattr(args, option)
        if text is None:
            continue
        try:
            changes[key] = _floats(text)
        except ValueError:
            parser.error(f"--{option} {text!r}: give a comma list of numbers, e.g. 0,0.4")
        if not changes[key]:
            parser.error(f"--{option}: give at least one value")
    if any(not 0 <= n < 1 for n in changes.get("noises", ())):
        parser.error("--noise: each fraction must be in [0, 1)")
    if any(r <= 0 for r in changes.get("rhos", ())):
        parser.error("--rho: each value must be > 0")
    for option in ("seeds", "epochs", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be a positive integer")
        if value is not None and option != "threads":
            changes[option] = value
    return dataclasses.replace(QUICK if args.quick else FULL, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from(args, parser)
    torch.set_num_threads(args.threads)
    progress = Progress()
    runs = []
    start = time.perf_counter()
    jobs = list(plan(config))
    for index, (method, noise, rho, seed) in enumerate(jobs, 1):
        setting = f"noise {noise:.0%}" + ("" if rho is None else f", rho {rho:g}")
        progress(f"[{index}/{len(jobs)}] {method}, {setting}, seed {seed}")
        runs.append(run(method, noise, rho, seed, config))
    record = {
        "config": dataclasses.asdict(config),
        "quick": args.quick,
        "machine": machine.describe(),
        "seconds": time.perf_counter() - start,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "study.json", record)
    table = report.report_markdown(record)
    (args.out / "study.md").write_text(table)
    report.plot_curves(args.out / "curves.png", record)
    report.plot_spectra(args.out / "spectra.png", record)
    print(table)
    progress(f"wrote {args.out}/study.json, study.md, curves.png, spectra.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
