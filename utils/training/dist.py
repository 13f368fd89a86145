"""One process, or one of several started by ``torchrun``: the process group, the
collectives the loop needs, rank-aware logging."""

from __future__ import annotations

from utils.cli import LOG_FORMAT, resolve_device, setup_logging

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed(device_name: str = "auto", timeout_s: float = 1800):
    """The ``DistEnv`` of this process for the block. Started by torchrun
    (``WORLD_SIZE`` > 1) it joins the process group (on CUDA: ``cuda:LOCAL_RANK`` and
    nccl; on a CPU: gloo), which it leaves at the end."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistEnv(device=device)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    try:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        yield DistEnv(rank, world, local_rank, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast(value, env: DistEnv):
    """Rank 0's ``value`` (any picklable object) on every process."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(value: float, env: DistEnv) -> float:
    """The mean of a float over the processes."""
    if not env.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device if env.device.type == "cuda" else None)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def gather_with_grad(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``x`` of every process concatenated along dim 0, keeping gradients. Backward sums
    what each process computes for each slice, so when every process evaluates the same
    global loss, DDP's averaging gives exactly that loss's gradient."""
    if not env.distributed:
        return x
    import torch.distributed.nn.functional as dnf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a private API
        return torch.cat(dnf.all_gather(x), dim=0)


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under torchrun, else itself."""
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def setup_rank_logging(level: str, env: DistEnv) -> None:
    """``utils.cli.setup_logging``; the other ranks log warnings and errors only, and
    under torchrun every line names its rank."""
    level = logging.getLevelName(level)
    fmt = LOG_FORMAT.replace("%(levelname)s", f"[rank {env.rank}] %(levelname)s") if env.distributed else LOG_FORMAT
    setup_logging(level if env.is_main else max(level, logging.WARNING), fmt)
