"""Runs the parts of ``fsam-bench`` in order and writes what they measured."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .chart import write_chart
from .digits import check_agreement
from .e2e import run_e2e
from .machine import describe, slug
from .measure import Budget, copy_bandwidth
from .profile_step import profile_tables
from .report import derive, e2e_table, host_table, step_table, variant_table, write_json
from .step_bench import DEFAULT_VARIANT, StepResult, run_preset

CPU_E2E_BATCH, CPU_E2E_BATCH_QUICK, CUDA_E2E_BATCH = 16, 4, 128
# 128 MiB per buffer: past every CPU cache and a GPU's L2, so the copy measures memory, and
# the same size for every preset keeps the fractions of one run comparable.
COPY_NUMEL = 1 << 25


def budgets(device: torch.device, quick: bool) -> tuple[Budget, Budget]:
    """(step budget per preset and dtype, end-to-end budget) on ``device``."""
    if device.type == "cuda":
        if quick:
            return Budget(5, 20, 500, 0.5), Budget(2, 5, 50, 2.0)
        return Budget(10, 50, 2000, 2.0), Budget(3, 10, 100, 5.0)
    if quick:
        return Budget(1, 5, 50, 1.5), Budget(1, 3, 10, 2.0)
    return Budget(2, 10, 200, 4.0), Budget(1, 5, 20, 8.0)


def gate_max_elements(device: torch.device, quick: bool) -> int | None:
    """On the CPU the reference loop is slow on 100 M-parameter presets: gate on a prefix."""
    if device.type == "cuda":
        return None
    return 1 << 20 if quick else 1 << 22


def e2e_batch(args: argparse.Namespace, device: torch.device) -> int:
    if args.e2e_batch is not None:
        return args.e2e_batch
    if device.type == "cuda":
        return CUDA_E2E_BATCH
    return CPU_E2E_BATCH_QUICK if args.quick else CPU_E2E_BATCH


def run(
    args: argparse.Namespace,
    *,
    presets: list[str],
    device: torch.device,
    dtypes: list[torch.dtype],
    backends: list[str],
    progress: Callable[[str], None],
    variants: list[str] | None = None,
) -> int:
    """The whole benchmark; returns the exit status (1 when any backend disagrees with reference
    or fails to run, e.g. a step that cannot be captured in a CUDA graph)."""
    started = time.perf_counter()
    machine = describe()
    record: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine,
        "device": str(device),
        "backends": ["reference", *backends],
        "quick": args.quick,
    }
    record["cpu_busy_at_start"] = _warn_if_busy(progress) if device.type == "cpu" else None
    progress(
        f"fsam-bench on {device} ({machine['gpu'] or machine['cpu']}), backends: reference, "
        f"{', '.join(backends) or '(no other backend available)'}"
    )
    agree = True
    if args.train_check:
        agree &= _training_check(backends, device, progress, record)

    variants = variants or [DEFAULT_VARIANT]
    step_budget, e2e_budget = budgets(device, args.quick)
    progress(f"measuring copy bandwidth on {COPY_NUMEL / 1e6:.0f}M fp32 elements")
    bandwidth = copy_bandwidth(device, COPY_NUMEL, step_budget)
    record["copy_bandwidth_gbs"] = bandwidth / 1e9
    results: list[StepResult] = []
    for preset in presets:
        for dtype in dtypes:
            results += run_preset(
                preset,
                backends,
                device,
                dtype,
                step_budget,
                gate_max_elements(device, args.quick),
                progress,
                variants=variants,
            )
            gc.collect()
    derive(results, bandwidth)
    record["step"] = [r.as_dict() for r in results]
    agree &= all(r.ok for r in results)

    tables = [step_table(results, bandwidth)]
    tables += [table for table in (variant_table(results), host_table(results)) if table is not None]
    if args.e2e:
        batch = e2e_batch(args, device)
        e2e = run_e2e(backends, device, batch, e2e_budget, progress)
        record["e2e"] = {"batch": batch, "results": [r.as_dict() for r in e2e]}
        tables.append(e2e_table(e2e, batch))
    record["elapsed_s"] = time.perf_counter() - started
    if "training_check" in record:
        tables.insert(0, _training_summary(record["training_check"]))
    verdict = "all backends agree with reference" if agree else "DISAGREEMENT or FAILURE: see FAILED above"
    text = "\n\n".join(tables) + f"\n\n{verdict}; {record['elapsed_s']:.0f} s\n"
    _write_outputs(args, record, results, text, device, progress)
    print(text, end="", flush=True)
    # After the results are written and printed: a profiler that fails or hangs costs only itself.
    if args.profile:
        progress(f"profiling {presets[0]} on {', '.join(backends)}")
        try:
            record["profile"] = profile_tables(presets[0], backends, device, dtypes[0])
        except Exception as exc:
            record["profile"] = f"--profile failed: {type(exc).__name__}: {exc}"
        print(f"\n{record['profile']}", flush=True)
        _write_outputs(args, record, results, f"{text}\n{record['profile']}\n", device, progress)
    return 0 if agree else 1


def _warn_if_busy(progress: Callable[[str], None]) -> float | None:
    """The share of the CPU other processes use right now (sampled over half a second),
    with a warning when it is high enough to distort CPU timings.

    On a shared CPU, torch's worker threads wait for descheduled siblings at every op, so
    competing work can slow the step many times over; such numbers must not be quoted.
    """
    busy = _cpu_busy_fraction(0.5)
    if busy is not None and busy > 0.25:
        progress(
            f"WARNING: other processes are using {100 * busy:.0f}% of the CPU: CPU timings will be noisy"
        )
    return busy


def _cpu_busy_fraction(seconds: float) -> float | None:
    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields)

    before = sample()
    time.sleep(seconds)
    after = sample()
    if before is None or after is None or after[1] == before[1]:
        return None
    return 1.0 - (after[0] - before[0]) / (after[1] - before[1])


def _training_check(backends: list[str], device: torch.device, progress, record: dict[str, Any]) -> bool:
    runs, verdicts = check_agreement(backends, device, progress)
    record["training_check"] = {
        name: {
            "agree": bool(verdicts.get(name, True)),
            "detail": verdicts[name].detail if name in verdicts else "the reference",
            "losses": runs[name].losses if name in runs else None,
            "test_accuracy": runs[name].test_accuracy if name in runs else None,
            "seconds": runs[name].seconds if name in runs else None,
        }
        for name in ["reference", *backends]
    }
    return all(entry["agree"] for entry in record["training_check"].values())


def _training_summary(check: dict[str, Any]) -> str:
    lines = ["digits MLP, 40 F-SAM steps (rho 0.1, sigma 1, lmbda 0.6; SGD lr 0.05 momentum 0.9):"]
    for name, entry in check.items():
        if entry["losses"] is None:
            lines.append(f"  {name:10s} FAILED: {entry['detail']}")
            continue
        verdict = "reference" if name == "reference" else ("agrees" if entry["agree"] else "DISAGREES")
        lines.append(
            f"  {name:10s} loss {entry['losses'][0]:.4f} -> {entry['losses'][-1]:.4f}, test accuracy "
            f"{100 * entry['test_accuracy']:.1f}%  {verdict}"
            + ("" if name == "reference" else f" ({entry['detail']})")
        )
    return "\n".join(lines)


def _write_outputs(args, record, results, text, device, progress) -> None:
    """--json, --png, and --results-dir (which adds the tables as text for READMEs)."""
    json_path, png_path = args.json, args.png
    if args.results_dir is not None:
        stem = slug(record["machine"], str(device))
        json_path = json_path or args.results_dir / f"{stem}.json"
        png_path = png_path or args.results_dir / f"{stem}.png"
        machine = record["machine"]
        header = (
            f"fsam-bench on {machine['gpu'] or machine['cpu']} ({machine['cpu_cores']} cores), torch "
            f"{machine['torch']}, commit {machine['commit']}, {machine['date']}\n\n"
        )
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / f"{stem}.txt").write_text(header + text)
        progress(f"wrote {args.results_dir / f'{stem}.txt'}")
    if json_path is not None:
        write_json(Path(json_path), record)
        progress(f"wrote {json_path}")
    if png_path is not None and any(r.total is not None for r in results):
        machine = record["machine"]
        title = (
            f"fsam_fused step vs reference on {machine['gpu'] or machine['cpu']} ({device}), "
            f"torch {machine['torch']}, {machine['date'][:10]}"
        )
        write_chart(Path(png_path), results, title)
        progress(f"wrote {png_path}")
