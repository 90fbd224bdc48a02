"""``fsam-bench``: agreement of every backend with the reference, then step timings."""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fsam_fused

from . import agreement, resnet_cifar, step_timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fsam-bench", description=__doc__)
    parser.add_argument("--device", default="cpu", help="device to time on (default: cpu)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per backend")
    parser.add_argument("--steps", type=int, default=40, help="training steps for the agreement check")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    fast = [b for b in fsam_fused.available_backends() if b != "reference"]
    device = torch.device(args.device)
    if device.type != "cuda":
        fast = [b for b in fast if b != "triton"]

    print(
        f"fsam_fused {fsam_fused.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("[1/2] agreement with reference")
    if not agreement.check(fast, steps=args.steps, log=lambda m: print(m, flush=True)):
        print("backends disagree with the reference; not timing them", file=sys.stderr)
        return 1

    shapes = resnet_cifar.parameter_shapes()
    numel = sum(s.numel() for s in shapes)
    print(
        "[2/2] first_step + second_step, ResNet-18/CIFAR shapes "
        f"({len(shapes)} tensors, {numel / 1e6:.2f} M params)"
    )
    timings = step_timing.run(
        shapes, ["reference", *fast], device, args.repeats, log=lambda m: print(m, flush=True)
    )
    reference_ms = timings[0].median_ms
    print(f"\n{'backend':<10}{'median ms':>11}{'± ms':>8}{'speedup':>9}{'of floor':>10}")
    for t in timings:
        print(
            f"{t.backend:<10}{t.median_ms:>11.2f}{t.spread_ms:>8.2f}"
            f"{reference_ms / t.median_ms:>8.2f}x{t.floor_fraction:>10.0%}"
        )
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
