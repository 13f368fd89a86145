"""One process, or one of several started by ``torchrun``: the process group, the
collectives the loop needs, rank-aware logging and progress bars."""

from __future__ import annotations

from utils.cli import LOG_FORMAT, UserError, resolve_device, setup_logging

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm


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


def setup_distributed(device_name: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1): on CUDA each
    process takes ``cuda:LOCAL_RANK`` and nccl, on a CPU gloo."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device.type == "cuda":
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local_rank, device)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device_name: str = "auto"):
    """``setup_distributed`` for the block, the process group left at its end."""
    env = setup_distributed(device_name)
    try:
        yield env
    finally:
        teardown_distributed()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast(value, env: DistEnv):
    """Rank 0's ``value`` on every process (any picklable object)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(value: float, env: DistEnv) -> float:
    """Mean of a float over all processes (the value itself in one process)."""
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


def check_global_batch(batch_size: int, env: DistEnv) -> None:
    if batch_size % env.world_size:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the number of processes ({env.world_size})")


def setup_rank_logging(level: str | int, env: DistEnv) -> None:
    """``utils.cli.setup_logging``; the other ranks log warnings and errors only, and
    under torchrun every line names its rank."""
    level = logging.getLevelName(level) if isinstance(level, str) else level
    fmt = LOG_FORMAT.replace("%(levelname)s", f"[rank {env.rank}] %(levelname)s") if env.distributed else LOG_FORMAT
    setup_logging(level if env.is_main else max(level, logging.WARNING), fmt)


def progress(iterable=None, env: DistEnv | None = None, enabled: bool = True, **kw):
    """tqdm on rank 0 only (and not at all unless ``enabled``)."""
    off = not enabled or (env is not None and not env.is_main)
    return tqdm(iterable, disable=off, dynamic_ncols=True, leave=False, **kw)
