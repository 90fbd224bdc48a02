"""``fsam-bench``: is every backend the same math as the reference, and how much faster?

With no arguments (the README's main job, under two minutes on a 2-core CPU):
  1. trains a small MLP on scikit-learn's digits with ``reference`` and every other
     available backend and checks that loss curves and final parameters agree;
  2. gates and times first_step + second_step of every backend on ResNet-18-for-CIFAR
     parameter shapes and prints the table.
Exits with status 1 when any backend disagrees with the reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import fsam_fused
from fsam_fused import backends as registry

from .presets import DEFAULT_PRESET, PRESETS, resolve_presets
from .runner import CPU_E2E_BATCH, CPU_E2E_BATCH_QUICK, CUDA_E2E_BATCH, run
from .step_bench import DEFAULT_VARIANT, VARIANTS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def runnable_backends(device: torch.device) -> list[str]:
    """Available fast backends that run on ``device``; Triton on the CPU only runs in its
    interpreter, a test vehicle rather than something to time, so it is left out there."""
    names = []
    for name in fsam_fused.available_backends():
        if name == registry.REFERENCE or (name == "triton" and device.type == "cpu"):
            continue
        try:
            registry.resolve(name, device.type)
        except RuntimeError:
            continue
        names.append(name)
    return names


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsam-bench",
        description=__doc__.split("\n\n")[0].removeprefix("``fsam-bench``: "),
        epilog="With no arguments: the digits agreement check, then the step benchmark on resnet18.",
    )
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"{', '.join(PRESETS)}, a comma list, or all (default {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16, or a comma list (default fp32)")
    parser.add_argument(
        "--variant",
        default=DEFAULT_VARIANT,
        help=f"SAM variants to time: {', '.join(VARIANTS)}, a comma list or all (default {DEFAULT_VARIANT})",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma list of backends to compare with reference (default: every available one)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions and a smaller correctness slice"
    )
    parser.add_argument("--e2e", action="store_true", help="also time whole ResNet-18 training steps")
    parser.add_argument(
        "--e2e-batch",
        type=int,
        default=None,
        help=f"end-to-end batch size (default {CUDA_E2E_BATCH} on CUDA, {CPU_E2E_BATCH} on the "
        f"CPU, {CPU_E2E_BATCH_QUICK} with --quick on the CPU)",
    )
    parser.add_argument(
        "--no-train-check",
        dest="train_check",
        action="store_false",
        help="skip the digits training agreement check",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print, per backend, a torch.profiler table of the step's host time by call "
        "(first preset and dtype)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument(
        "--png", type=Path, default=None, help="write the speedup/bandwidth chart to this PNG"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="write <machine>_<date>.json and .png into this folder (e.g. benchmarks/results)",
    )
    return parser


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse and validate; usage errors exit with status 2 and a message naming the fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        presets = resolve_presets(args.preset)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible here; use --device cpu")
    dtypes = _comma_list(args.dtype)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        parser.error(f"--dtype {args.dtype!r}: choose from {', '.join(DTYPES)} (a comma list is fine)")
    if args.backends is None:
        names = runnable_backends(device)
    else:
        names = [n for n in _comma_list(args.backends) if n != registry.REFERENCE]
        for name in names:
            if name == registry.AUTO or name not in registry.known_backends():
                parser.error(
                    f"--backends: {name!r} is not a backend; choose from "
                    f"{', '.join(b for b in registry.known_backends() if b != registry.AUTO)}"
                )
            try:
                registry.resolve(name, device.type)
            except RuntimeError as exc:
                parser.error(f"--backends: {exc}")
    if args.e2e_batch is not None and args.e2e_batch < 1:
        parser.error("--e2e-batch must be a positive integer")
    variants = list(VARIANTS) if args.variant == "all" else _comma_list(args.variant)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variant {args.variant!r}: choose from {', '.join(VARIANTS)} (a comma list, or all)")
    plan = dict(presets=presets, device=device, dtypes=[DTYPES[d] for d in dtypes], backends=names)
    return args, {**plan, "variants": variants}


class Progress:
    """Timestamped progress lines on stderr, so the tables on stdout stay clean."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status (1 when a backend disagrees or fails)."""
    args, plan = _parse(argv)
    return run(args, **plan, progress=Progress())


if __name__ == "__main__":
    raise SystemExit(main())
