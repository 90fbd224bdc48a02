"""Derived figures (speedup, bandwidth fraction), terminal tables and the JSON record."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .e2e import E2EResult
from .step_bench import DEFAULT_VARIANT, PLAIN_STEP, StepResult


def derive(results: Sequence[StepResult], copy_bandwidth: float) -> None:
    """Add speedup over ``reference``, effective bandwidth and host time per tensor to each
    timed result.

    Effective bandwidth is the bytes model's traffic (DESIGN.md section 3) over the
    measured time, so a backend that moves more bytes than the model shows a lower
    fraction; the reference loop, which moves several times that, is rated the same way.
    Host time per tensor is the time above the bytes floor over the tensor count: on a
    preset of many tiny tensors (``tiny``), where the floor is a few microseconds, it is the
    per-tensor host work of the step (DESIGN.md section 3's second half).
    """
    reference = {(r.preset, r.dtype, r.variant): r for r in results if r.backend == "reference" and r.ok}
    for r in results:
        if r.total is None:
            continue
        seconds = r.total.median * 1e-3
        r.derived["effective_bandwidth_gbs"] = r.model_bytes / seconds / 1e9
        r.derived["bandwidth_fraction"] = r.model_bytes / seconds / copy_bandwidth
        r.derived["floor_ms"] = 1e3 * r.model_bytes / copy_bandwidth
        r.derived["host_us_per_tensor"] = 1e3 * max(0.0, r.total.median - r.derived["floor_ms"]) / r.tensors
        ref = reference.get((r.preset, r.dtype, r.variant))
        if ref is not None and ref.total is not None:
            r.derived["speedup"] = ref.total.median / r.total.median
    for r, plain in _variant_pairs(results):
        r.derived[f"time_vs_{plain.variant}"] = r.total.median / plain.total.median


def _variant_pairs(results: Sequence[StepResult]) -> list[tuple[StepResult, StepResult]]:
    """(variant, plain step) pairs timed in the same run on the same preset, dtype and backend:
    each variant against DEFAULT_VARIANT and against its PLAIN_STEP."""
    timed = {(r.preset, r.dtype, r.backend, r.variant): r for r in results if r.total is not None}
    pairs = []
    for (preset, dtype, backend, variant), r in timed.items():
        for plain in dict.fromkeys([PLAIN_STEP.get(variant), DEFAULT_VARIANT]):
            base = timed.get((preset, dtype, backend, plain))
            if plain is not None and plain != variant and base is not None:
                pairs.append((r, base))
    # Results come variant by variant; list each backend's variants together.
    case = {key[:3]: i for i, key in reversed(list(enumerate(timed)))}
    return sorted(pairs, key=lambda pair: case[(pair[0].preset, pair[0].dtype, pair[0].backend)])


NOISY_SPREAD_PCT = 50.0  # interquartile range as % of the median beyond which a row is not quotable


def _noise_warning(spreads: Sequence[float]) -> list[str]:
    noisy = sum(spread > NOISY_SPREAD_PCT for spread in spreads)
    if not noisy:
        return []
    return [
        f"WARNING: {noisy} row(s) have an interquartile range above {NOISY_SPREAD_PCT:.0f}% of the median: "
        "other processes competed for the machine; rerun on a quiet machine before quoting them."
    ]


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> str:
    """Aligned columns: the first ``left`` columns are labels (left-aligned), the rest numbers."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def step_table(results: Sequence[StepResult], copy_bandwidth: float) -> str:
    """The optimizer-step table: one row per preset, dtype and backend."""
    header = [
        "preset",
        "dtype",
        "backend",
        "variant",
        "tensors",
        "params",
        "first ms",
        "second ms",
        "step ms",
        "spread",
        "speedup",
        "GB/s",
        "of copy",
        "peak MiB 1st/steady",
    ]
    rows = []
    for r in results:
        lead = [r.preset, r.dtype, r.backend, r.variant or "-", str(r.tensors), f"{r.numel / 1e6:.2f}M"]
        if r.total is None:
            rows.append([*lead, "FAILED", "-", "-", "-", "-", "-", "-", "-"])
            continue
        d = r.derived
        rows.append(
            [
                *lead,
                f"{r.first.median:.2f}" if r.first is not None else "-",
                f"{r.second.median:.2f}" if r.second is not None else "-",
                f"{r.total.median:.2f}",
                f"±{r.total.spread_pct / 2:.0f}%",
                f"{d['speedup']:.2f}x" if "speedup" in d else "-",
                f"{d['effective_bandwidth_gbs']:.1f}",
                f"{100 * d['bandwidth_fraction']:.0f}%",
                f"{_mib(r.peak_first_call_bytes)}/{_mib(r.peak_steady_bytes)}",
            ]
        )
    note = (
        "step = first_step + second_step with a no-op base optimizer (the SAM work alone; the "
        "'torch ...' rows are PyTorch's own optimizers' step on the same tensors, lr 0; on CUDA the "
        "'<backend> graph' rows replay that backend's step captured in a CUDA graph); median "
        f"of interleaved repetitions, spread = half the interquartile range. GB/s: bytes model "
        f"(DESIGN.md 3) / time; 'of copy': vs the copy bandwidth measured now, {copy_bandwidth / 1e9:.1f} "
        "GB/s. Peak: memory allocated above the step's start, on the first call (allocates state) "
        "and in steady state."
    )
    failures = [f"{r.preset} {r.dtype} {r.backend}: {r.status}" for r in results if not r.ok]
    spreads = [r.total.spread_pct for r in results if r.total is not None]
    return "\n".join([_table(header, rows, left=4), note, *failures, *_noise_warning(spreads)])


def variant_table(results: Sequence[StepResult]) -> str | None:
    """Each SAM variant's step against the plain step(s) it is compared with, or None if the
    run timed no variant beside its plain step."""
    rows = [
        [
            r.preset,
            r.dtype,
            r.backend,
            r.variant,
            plain.variant,
            f"{r.total.median:.2f}",
            f"{plain.total.median:.2f}",
            f"{100 * (r.total.median / plain.total.median - 1):+.1f}%",
            f"{100 * (r.model_bytes / plain.model_bytes - 1):+.0f}%",
        ]
        for r, plain in _variant_pairs(results)
    ]
    if not rows:
        return None
    header = ["preset", "dtype", "backend", "variant", "against", "step ms", "against ms", "time", "bytes"]
    note = (
        "time: the variant's step time over the other's, minus 1 (medians of the same interleaved run); "
        "bytes: the same for the bytes model (ASAM reads p in the norm pass as well)."
    )
    return "\n".join([_table(header, rows, left=5), note])


HOST_OVERHEAD_PRESET = "tiny"


def host_table(results: Sequence[StepResult]) -> str | None:
    """Host time per tensor on the many-tiny-tensors preset, or None if it was not run."""
    rows = [
        [
            r.dtype,
            r.backend,
            r.variant or "-",
            str(r.tensors),
            f"{r.total.median:.2f}",
            f"{r.derived['floor_ms']:.3f}",
            f"{r.derived['host_us_per_tensor']:.3f}",
        ]
        for r in results
        if r.preset == HOST_OVERHEAD_PRESET and r.total is not None
    ]
    if not rows:
        return None
    header = ["dtype", "backend", "variant", "tensors", "step ms", "floor ms", "host us/tensor"]
    note = (
        f"host us/tensor = (step - bytes floor) / tensors on the {HOST_OVERHEAD_PRESET} preset: the step's "
        "per-tensor host work, nothing changed since the last step (DESIGN.md 3: target 0.5 us)."
    )
    return "\n".join([_table(header, rows, left=3), note])


def e2e_table(results: Sequence[E2EResult], batch: int) -> str:
    """The end-to-end table: one row per variant."""
    header = ["variant", "step ms", "spread", "vs SGD", "vs SAM(reference)"]
    rows = [
        [
            r.variant,
            f"{r.time.median:.1f}",
            f"±{r.time.spread_pct / 2:.0f}%",
            f"{r.vs_sgd:.2f}x",
            "-" if r.vs_sam_reference is None else f"{r.vs_sam_reference:.2f}x",
        ]
        for r in results
    ]
    note = f"ResNet-18 CIFAR, batch {batch}, synthetic images, SGD lr 0.05 momentum 0.9."
    warning = _noise_warning([r.time.spread_pct for r in results])
    return "\n".join([_table(header, rows, left=1), note, *warning])


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` (plain data) as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
