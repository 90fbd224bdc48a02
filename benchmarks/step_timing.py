"""Time first_step + second_step of every backend on a list of parameter shapes."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from fsam_fused import FriendlySAM

# Bytes each element moves in one fp32 step (DESIGN.md section 3): sq_norm reads g, m;
# perturb_ reads g, m, p and writes m, backup, p; restore_ reads backup, writes p.
BYTES_PER_ELEMENT_FP32 = 40


@dataclass
class Timing:
    backend: str
    median_ms: float
    spread_ms: float
    floor_fraction: float


def copy_bandwidth(numel: int, device: torch.device, repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read plus write) on ``device``."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * 4 * numel / statistics.median(times[2:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(shapes, backend: str, device: torch.device, repeats: int) -> list[float]:
    """Seconds per first_step + second_step, one entry per repetition after warm-up."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    opt = FriendlySAM(params, torch.optim.SGD, rho=0.1, lmbda=0.6, lr=0.05, momentum=0.9, backend=backend)
    times = []
    for i in range(repeats + 2):
        for p, g in zip(params, grads):
            p.grad = g
        _sync(device)
        start = time.perf_counter()
        opt.first_step()
        opt.second_step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def run(shapes, backends: list[str], device: torch.device, repeats: int, log=print) -> list[Timing]:
    numel = sum(torch.Size(s).numel() for s in shapes)
    bandwidth = copy_bandwidth(numel, device)
    floor = BYTES_PER_ELEMENT_FP32 * numel / bandwidth
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> bytes floor {floor * 1e3:.2f} ms per step")
    results = []
    for backend in backends:
        log(f"  timing {backend} ({repeats} repetitions) ...")
        times = time_step(shapes, backend, device, repeats)
        median = statistics.median(times)
        spread = (max(times) - min(times)) / 2
        results.append(Timing(backend, median * 1e3, spread * 1e3, floor / median))
    return results
