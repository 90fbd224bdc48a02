"""F-SAM on several processes: DDP (per-worker or synchronised perturbation) or FSDP2.

    torchrun --standalone --nproc_per_node=2 examples/distributed.py --mode per_worker
    torchrun --standalone --nproc_per_node=2 examples/distributed.py --mode sync
    torchrun --standalone --nproc_per_node=2 examples/distributed.py --mode sharded

Runs on GPUs with NCCL when CUDA is available, else on the CPU with gloo. The data are
random batches, different on every rank; at the end rank 0 reports whether all ranks
hold the same parameters.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from fsam_fused import FriendlySAM
from fsam_fused.distributed import first_pass


def build_model(mode: str, device: torch.device) -> nn.Module:
    """A small classifier, wrapped in DDP or sharded with FSDP2 depending on ``mode``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model = model.to(device)
    if mode != "sharded":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("per_worker", "sync", "sharded"), default="per_worker")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model = build_model(args.mode, device)
    optimizer = FriendlySAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        sigma=1.0,
        lmbda=0.6,
        lr=0.05,
        momentum=0.9,
        # Per-worker ranks use their own norms but must skip a non-finite step together.
        replica_group=dist.group.WORLD if args.mode == "per_worker" else None,
    )
    # DDP modes choose whether the first backward all-reduces; FSDP2 always reduce-scatters.
    first_pass_mode = "per_worker" if args.mode == "per_worker" else "sync"

    data = torch.Generator().manual_seed(1 + rank)
    for _ in range(args.steps):
        x = torch.randn(64, 32, generator=data).to(device)
        y = torch.randint(0, 10, (64,), generator=data).to(device)
        with first_pass(model, mode=first_pass_mode):
            F.cross_entropy(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.second_step(zero_grad=True)

    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in full])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    if rank == 0:
        agree = all(torch.equal(flat, other) for other in everyone)
        print(f"mode={args.mode} steps={args.steps} rank 0 loss {loss.item():.4f} ranks agree: {agree}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
