"""The processes of a run (one, or several under ``torchrun``): the process group and collectives,
rank-aware logging, the lock on --out-dir, Ctrl-C held while a checkpoint is saved."""

from __future__ import annotations

from utils.cli import LOG_FORMAT, UserError, resolve_device, setup_logging

import contextlib
import logging
import os
import signal
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from utils.io import exclusive_lock

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """This process: its rank, the world size, its device; collectives are no-ops for one process."""

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

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every process concatenated, keeping gradients (with DDP's averaging: the global loss's)."""
        if not self.distributed:
            return x
        import torch.distributed.nn.functional as dnf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a private API
            return torch.cat(dnf.all_gather(x), dim=0)


@contextlib.contextmanager
def distributed(device_name: str, log_level: str):
    """The ``DistEnv`` of this process, in the process group under torchrun (nccl on CUDA, else
    gloo), with logging set up: ranks but 0 log warnings only, lines name ranks."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), resolve_device(device_name)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    env = DistEnv(int(os.environ["RANK"]) if world > 1 else 0, world, device)
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


@contextlib.contextmanager
def deferred_sigint():
    """Hold a Ctrl-C during the block (a checkpoint and its state are written as a pair)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if got:
        raise KeyboardInterrupt


def _remove_stale_temp_files(directory: Path) -> None:
    """Remove the ``<file>.tmp<pid>`` files a killed save left (a live process's stay)."""
    for p in sorted(directory.glob("*.tmp*")):
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and p.is_file():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                log.info("%s: removed, the temporary file of an interrupted save", p)
                p.unlink(missing_ok=True)
            except PermissionError:  # someone else's live process
                pass


@contextlib.contextmanager
def out_dir_lock(out: Path, env: DistEnv):
    """The run's lock on ``out``, taken by rank 0 (all stop with its line); a new dir left empty goes."""
    created = not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            box = [None]  # rank 0's error on every process
            if env.is_main:
                try:
                    stack.enter_context(exclusive_lock(out))
                except UserError as e:
                    box = [str(e)]
                else:
                    _remove_stale_temp_files(out)
            if env.distributed:
                dist.broadcast_object_list(box, src=0)
            if box[0]:
                raise UserError(box[0])
            yield out
    finally:
        if created and env.is_main:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
