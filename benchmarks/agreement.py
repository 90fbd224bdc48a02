"""When two runs of the optimizer count as the same math: tolerances and comparison.

The tolerances are the package's one table (:mod:`fsam_fused.testing`), shared with the
test suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Verdict:
    """Whether two tensor lists agree, and the worst element if they do not."""

    agree: bool
    detail: str

    def __bool__(self) -> bool:
        return self.agree


def compare(actual: Sequence[Tensor], expected: Sequence[Tensor], what: str, **tolerance: float) -> Verdict:
    """Element-wise ``|a - e| <= atol + rtol * |e|`` over two equally long tensor lists."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} vs {len(expected)} tensors"
    rtol, atol = tolerance["rtol"], tolerance["atol"]
    worst, worst_at = 0.0, ""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        a, e = a.detach().float().cpu(), e.detach().float().cpu()
        if a.shape != e.shape:
            return Verdict(False, f"{what}[{i}]: shape {tuple(a.shape)} vs {tuple(e.shape)}")
        if a.numel() == 0:
            continue
        if not torch.isfinite(a).all() and not torch.equal(torch.isfinite(a), torch.isfinite(e)):
            return Verdict(False, f"{what}[{i}]: non-finite values where the reference has none")
        excess = ((a - e).abs() - (atol + rtol * e.abs())).max().item()
        if excess > worst:
            worst, worst_at = excess, f"{what}[{i}]: max |diff| {(a - e).abs().max().item():.3g}"
    if worst > 0:
        return Verdict(False, f"{worst_at} exceeds rtol={rtol:g}, atol={atol:g}")
    return Verdict(True, f"within rtol={rtol:g}, atol={atol:g}")
