"""The processes of a run: one, or several started by ``torchrun`` (the process group, the
collectives the loop needs, rank-aware logging), the lock they share on the run's
--out-dir, and Ctrl-C held while a checkpoint is saved."""

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


@contextlib.contextmanager
def deferred_sigint():
    """Hold a Ctrl-C that arrives during the block and raise it after, so that a checkpoint
    and its training state are written as a pair. Outside the main thread: nothing."""
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
    """``utils.io.exclusive_lock`` on ``out`` for a whole run: rank 0 takes it (and removes
    stale temporary files) and tells the others, so every process stops with the same
    line. A directory this run created is removed again if it is left empty."""
    created = not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            error = None
            if env.is_main:
                try:
                    stack.enter_context(exclusive_lock(out))
                except UserError as e:
                    error = str(e)
                else:
                    _remove_stale_temp_files(out)
            error = env.broadcast(error)
            if error:
                raise UserError(error)
            yield out
    finally:
        if created and env.is_main:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
