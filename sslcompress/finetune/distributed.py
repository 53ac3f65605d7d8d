"""torchrun support: one process per rank, gradients averaged by DistributedDataParallel.

Every rank applies the same proximal step to the same averaged weights, so the group zeros
agree across ranks without extra communication; BatchNorm statistics are the one thing each
rank computes on its own data, so they are broadcast from rank 0 before anything reads them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str) -> DistEnv:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistEnv(rank, world, local)


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, device: str) -> nn.Module:
    if not env.enabled:
        return model
    ids = [env.local_rank] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def broadcast_buffers(model: nn.Module, env: DistEnv) -> None:
    if env.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def all_sum(values: list[float], env: DistEnv, device: str) -> list[float]:
    if not env.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in a fixed order."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ranks_agree(model: nn.Module, env: DistEnv) -> bool:
    """True when every rank holds bit-identical weights and buffers."""
    if not env.enabled:
        return True
    mine = digest(model)
    everyone: list[str | None] = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    return all(d == mine for d in everyone)
