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
    """This process: its rank among ``world_size``, its device; the collectives are no-ops
    for a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every process."""
        box = [value]
        if self.distributed:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every process concatenated along dim 0, keeping gradients. Backward sums
        each slice's gradient over the processes: with DDP's averaging, exactly the
        gradient of the global loss every process computes."""
        if not self.distributed:
            return x
        import torch.distributed.nn.functional as dnf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a private API
            return torch.cat(dnf.all_gather(x), dim=0)


@contextlib.contextmanager
def distributed(device_name: str = "auto", log_level: str | None = None):
    """The ``DistEnv`` of this process for the block; under torchrun (``WORLD_SIZE`` > 1)
    in the process group (nccl on ``cuda:LOCAL_RANK``, else gloo). With ``log_level``,
    logging is set up: the other ranks log warnings only, and every line names its rank."""
    env = DistEnv(device=resolve_device(device_name))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        env = DistEnv(int(os.environ["RANK"]), world, env.device)
        if env.device.type == "cuda":
            env.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(env.device)
    if log_level:
        level = logging.getLevelName(log_level)
        tag = f"[rank {env.rank}] %(levelname)s" if env.distributed else "%(levelname)s"
        setup_logging(level if env.is_main else max(level, logging.WARNING), LOG_FORMAT.replace("%(levelname)s", tag))
    try:
        if env.distributed and not dist.is_initialized():
            # 30 minutes (nccl's default is 10): the others wait while rank 0 validates
            backend = "nccl" if env.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        yield env
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()
