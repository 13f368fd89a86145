"""Shared helpers of the two training scripts (recall_train.py, rank_train.py).

- ``setup_distributed`` / ``teardown_distributed``: one process, or one of several
  started by ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); gloo on CPU,
  nccl on CUDA.
- ``seed_everything``; ``ResumableSampler`` (a ``DistributedSampler`` that can skip the
  batches of an epoch already trained before an interruption).
- ``build_optimizer`` + ``build_scheduler`` (linear warm-up, then cosine decay or
  constant), ``gather_with_grad`` (all-gather that keeps gradients, for a contrastive
  loss whose negatives span the global batch).
- ``augment_pil``: the authors' training augmentation (RandomRotation(5) then
  RandomHorizontalFlip(0.3)) without torchvision.
- ``MetricsWriter``: the per-run metrics CSV (rank 0 only).
- ``save_train_state`` / ``load_train_state``: optimizer, scheduler, scaler, step,
  epoch and RNG states (of every process), in a file separate from the model
  checkpoint, written atomically.
- ``setup_rank_logging``: ``utils.cli.setup_logging`` made rank-aware.
- ``check_text_file``: the input check of a CSV, run before any work.
- ``run_lock``: the out-dir's exclusive lock for a whole run (rank 0 holds it under
  torchrun), with ``clean_stale_temp_files`` (what a killed save left behind).
- ``Diverged`` / ``check_finite_loss``: a NaN/inf loss or gradient stops the run before
  the weights or any checkpoint take it.
- ``open_run``, ``restore_state``, ``start_run`` (metrics CSV + config.json),
  ``save_checkpoint_and_state``, ``wrap_ddp``, ``amp_autocast``, ``optimizer_step``:
  the run mechanics both scripts share, so each keeps only what differs.
"""

from __future__ import annotations

from utils.cli import LOG_FORMAT, DataError, UserError, input_file, resolve_device, setup_logging

import contextlib
import csv
import json
import logging
import math
import os
import random
import re
import signal
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from utils.hashing import model_hash
from utils.io import atomic_path, atomic_write, count_text_rows, exclusive_lock, write_json

log = logging.getLogger(__name__)

STATE_FORMAT = 1


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------
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
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1).

    On CUDA each process takes ``cuda:LOCAL_RANK`` and the nccl backend; on CPU the
    gloo backend. A plain single process needs no environment variables.
    """
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local_rank, device)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_mean(value: float, env: DistEnv) -> float:
    """Mean of a float over all processes (the value itself in one process)."""
    if not env.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if env.device.type == "cuda":
        t = t.to(env.device)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def gather_with_grad(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate ``x`` of every process along dim 0, keeping gradients.

    The backward pass sums the gradients that every process computes for each slice,
    so when every process evaluates the same global loss, DDP's averaging of the
    parameter gradients gives exactly the gradient of that loss.
    """
    if not env.distributed:
        return x
    import torch.distributed.nn.functional as dnf  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a private API
        return torch.cat(dnf.all_gather(x), dim=0)


def setup_rank_logging(level: str | int, env: DistEnv) -> None:
    """``utils.cli.setup_logging`` plus what several processes need: the other ranks
    log warnings and errors only, and under torchrun every line names its rank."""
    level = logging.getLevelName(level) if isinstance(level, str) else level
    fmt = LOG_FORMAT
    if env.distributed:
        fmt = LOG_FORMAT.replace("%(levelname)s", f"[rank {env.rank}] %(levelname)s")
    setup_logging(level if env.is_main else max(level, logging.WARNING), fmt)


def progress(iterable=None, env: DistEnv | None = None, enabled: bool = True, **kw):
    """tqdm on rank 0 only (and not at all unless ``enabled``: --no-progress)."""
    return tqdm(
        iterable, disable=not enabled or (env is not None and not env.is_main), dynamic_ncols=True, leave=False, **kw
    )


# ---------------------------------------------------------------------------
# randomness and data order
# ---------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start after its first ``start`` samples
    (of this process), so a resumed run sees exactly the batches it had not seen.

    The permutation depends only on ``seed`` and the epoch, not on the number of
    processes; process ``r`` takes positions ``r, r + W, ...``, so the union of the
    processes' k-th batches is the k-th batch of a single process whose batch is
    ``W`` times larger.
    """

    def __init__(self, dataset, env: DistEnv, shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        super().__init__(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader, so that iterating it never consumes the
    global torch RNG (which dropout uses): resumed runs stay identical."""
    return torch.Generator().manual_seed(seed)


def augment_pil(img: Image.Image, rng: np.random.Generator, degrees: float = 5.0, flip_p: float = 0.3) -> Image.Image:
    """The authors' ``RandomRotation(5)`` then ``RandomHorizontalFlip(0.3)``: rotation
    by a uniform angle in [-degrees, degrees] about the centre, nearest-neighbour, same
    size (no expand), black fill; then a left-right mirror with probability flip_p."""
    angle = float(rng.uniform(-degrees, degrees))
    fill = (0,) * len(img.getbands()) if len(img.getbands()) > 1 else 0
    img = img.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=fill)
    if rng.random() < flip_p:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


# ---------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------
def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam; biases, norms and scalars get no decay
    under AdamW."""
    params = [(n, p) for n, p in params if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters (is everything frozen?)")
    if name == "adamw":
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    if name == "adam":
        return torch.optim.Adam([p for _, p in params], lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


class WarmupSchedule:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to
    ``min_ratio`` at ``total`` steps (or constant with ``kind='constant'``)."""

    def __init__(self, warmup: int, total: int, kind: str = "cosine", min_ratio: float = 0.0):
        if kind not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.warmup, self.total, self.kind, self.min_ratio = int(warmup), int(total), kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer, warmup: int, total: int, kind: str = "cosine"):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(warmup, total, kind))


# ---------------------------------------------------------------------------
# metrics CSV
# ---------------------------------------------------------------------------
class MetricsWriter:
    """Append rows to ``path`` (a CSV with a fixed header); only rank 0 writes.

    The file is (re)created atomically; each row is then one appended, flushed line (a
    rewrite per step would cost O(steps) a step). ``keep_rows`` (on resume) keeps only
    the rows written when the training state was saved, so a resumed run's CSV reads
    like an uninterrupted one and a line torn by a kill is dropped.
    """

    def __init__(self, path, fields: list[str], env: DistEnv, keep_rows: int | None = None):
        self.path, self.fields, self.env = str(path), list(fields), env
        self.rows = 0
        if not env.is_main:
            return
        old: list[dict] = []
        if keep_rows is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8", newline="") as f:
                old = list(csv.DictReader(f))[:keep_rows]
            if len(old) < keep_rows:
                log.warning("%s: holds %d rows, the training state expected %d", self.path, len(old), keep_rows)
        with atomic_write(self.path) as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
        self.rows = len(old)

    def write(self, **row) -> None:
        if not self.env.is_main:
            return
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()}
            )
        self.rows += 1


def read_metrics(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------
# resumable training state
# ---------------------------------------------------------------------------
def rng_state() -> dict:
    """RNG states of this process in a form ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(
    path,
    env: DistEnv,
    *,
    optimizer,
    scheduler,
    scaler,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    metrics_rows: int,
    model_file: str,
    model_hash: str,
    config: dict,
    extra: dict | None = None,
) -> None:
    """Write the state needed to resume (collective: every process must call it; rank 0
    writes). ``epoch``/``batch_in_epoch`` say where training continues: batch
    ``batch_in_epoch`` of epoch ``epoch``. ``model_hash`` ties the state to the model
    checkpoint saved with it."""
    rngs = [rng_state()]
    if env.distributed:
        rngs = [None] * env.world_size
        dist.all_gather_object(rngs, rng_state())
    if not env.is_main:
        return
    obj = {
        "format": STATE_FORMAT,
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "metrics_rows": int(metrics_rows),
        "world_size": env.world_size,
        "model_file": model_file,
        "model_hash": model_hash,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs,
        "config": config,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_train_state(path) -> dict:
    """The state ``save_train_state`` wrote; a missing, truncated or foreign file is a
    ``UserError`` naming it."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no training state to resume from (was --out-dir the directory of an earlier run?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle with code
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: cannot be read as a training state ({why}); it is damaged: start again without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not a training state file of this package")
    return state


def check_resume_config(state: dict, config: dict, path: str) -> None:
    """Refuse to resume with settings that change the data order or the schedule."""
    saved = state.get("config", {})
    diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise UserError(f"{path}: cannot resume: settings differ from the interrupted run ({lines})")


def restore_rng(state: dict, env: DistEnv) -> None:
    rngs = state["rng"]
    if len(rngs) != env.world_size:
        log.warning(
            "resuming with %d processes, the state was saved by %d: RNG streams are "
            "restarted from process 0's and the run is no longer bit-identical",
            env.world_size,
            len(rngs),
        )
        set_rng_state(rngs[0])
    else:
        set_rng_state(rngs[env.rank])


# ---------------------------------------------------------------------------
# run set-up and saving, the mechanics both training scripts share
# ---------------------------------------------------------------------------
def check_text_file(path, what: str) -> Path:
    """An existing, readable, non-empty UTF-8 text file, checked before any work: else a
    ``DataError`` naming the file (and the first line that is not UTF-8)."""
    p = input_file(path, what)
    if not count_text_rows(p):
        raise DataError(f"{what} {path}: empty file")
    return p


_TEMP_NAME = re.compile(r"^(?P<target>.+)\.tmp(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_temp_files(directory) -> list[Path]:
    """Remove ``<file>.tmp<pid>`` files (``utils.data.atomic_path``'s) whose process is
    gone: what a kill during a save leaves. Files of live processes are kept. Returns
    what was removed."""
    removed = []
    for p in sorted(Path(directory).iterdir()):
        m = _TEMP_NAME.match(p.name)
        if not m or not p.is_file() or _pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        log.info(
            "%s: removed %d temporary file(s) of an interrupted save: %s",
            directory,
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


@contextlib.contextmanager
def run_lock(out_dir, env: DistEnv):
    """Hold ``out_dir/.lock`` (``utils.data.exclusive_lock``) for a whole training run so
    that a second run into the same directory stops with "another run holds ...". Under
    torchrun rank 0 takes the lock and tells the others the outcome, so every process
    stops with the same one-line error. Once the lock is held, temporary files left by a
    killed save are removed. A directory this run created is removed again when the run
    ends having written nothing into it (a bad --init, a damaged state, ...)."""
    out = Path(out_dir)
    created = not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            error = None
            if env.is_main:
                try:
                    stack.enter_context(exclusive_lock(out))
                except UserError as e:
                    error = str(e)
            if env.distributed:
                box = [error]
                dist.broadcast_object_list(box, src=0)
                error = box[0]
            if error:
                raise UserError(error)
            if env.is_main:
                clean_stale_temp_files(out)
            barrier(env)
            yield out
    finally:
        if created and env.is_main:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty


class Diverged(UserError):
    """The loss or the gradients became NaN/inf: training stops before the weights (and
    any checkpoint) take the non-finite values."""


def check_finite_loss(loss: float, step: int, hint: str = "") -> float:
    """``loss`` unless it is NaN/inf (then ``Diverged``; every process sees the same mean
    loss, so all stop together)."""
    if not math.isfinite(loss):
        raise Diverged(
            f"step {step}: the loss is {loss} (training diverged; the last checkpoint was not overwritten){hint}"
        )
    return loss


def open_run(args, resume_keys, state_file: str) -> tuple[Path, dict, dict | None]:
    """Create ``args.out_dir``; the settings that must not change on resume
    (``resume_keys`` of ``args``); with ``args.resume`` the saved training state,
    checked against them (else None)."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in resume_keys}
    state = None
    if args.resume:
        state = load_train_state(out / state_file)
        check_resume_config(state, config, str(out / state_file))
    return out, config, state


def check_global_batch(batch_size: int, env: DistEnv) -> None:
    if batch_size % env.world_size:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the number of processes ({env.world_size})")


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under torchrun, else itself."""
    if not env.distributed:
        return module
    device = env.device
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def restore_state(state: dict | None, optimizer, scheduler, scaler, env: DistEnv) -> tuple[int, int, int, float]:
    """Load optimizer, scheduler, scaler and RNG states of a resumed run; return
    (step, epoch, batch_in_epoch, best) where it continues ((0, 0, 0, -1.0) for a new run)."""
    if state is None:
        return 0, 0, 0, -1.0
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    restore_rng(state, env)
    return (state["step"], state["epoch"], state["batch_in_epoch"], state["extra"].get("best", -1.0))


def start_run(
    out: Path, fields: list[str], env: DistEnv, state: dict | None, args, metrics_file: str = "metrics.csv"
) -> MetricsWriter:
    """The metrics CSV (cut back to the saved rows on resume) and, for a new run,
    ``config.json`` with every option and the number of processes."""
    metrics = MetricsWriter(
        out / metrics_file, fields, env, keep_rows=state["metrics_rows"] if state is not None else None
    )
    if env.is_main and state is None:
        write_json(
            out / "config.json", json.loads(json.dumps(vars(args) | {"world_size": env.world_size}, default=str))
        )
    return metrics


def save_checkpoint_and_state(
    model: torch.nn.Module,
    save_model,
    out: Path,
    env: DistEnv,
    *,
    model_file: str,
    state_file: str,
    optimizer,
    scheduler,
    scaler,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    metrics: MetricsWriter,
    config: dict,
    best: float,
) -> None:
    """``save_model(model, out / model_file)`` on rank 0, then the training state that
    resumes from it (collective: every process calls it), then a barrier. Ctrl-C waits
    for the pair to be written, so an interrupted run always resumes."""
    with deferred_sigint():
        h = model_hash(model)
        if env.is_main:
            save_model(model, out / model_file)
        save_train_state(
            out / state_file,
            env,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            step=step,
            epoch=epoch,
            batch_in_epoch=batch_in_epoch,
            metrics_rows=metrics.rows,
            model_file=model_file,
            model_hash=h,
            config=config,
            extra={"best": best},
        )
        barrier(env)


@contextlib.contextmanager
def deferred_sigint():
    """Hold a Ctrl-C (SIGINT) that arrives during the block and raise it after, so that a
    checkpoint and its training state are written as a pair (a kill still interrupts;
    atomic writes leave the previous pair intact then). Outside the main thread: nothing."""
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


def amp_autocast(amp: bool):
    """A factory of the forward pass's context: fp16 autocast on CUDA, else nothing."""
    return (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else contextlib.nullcontext


def optimizer_step(optimizer, scheduler, scaler, params, clip_grad: float) -> torch.Tensor:
    """Unscale (AMP), clip the gradient norm of ``params`` (``clip_grad`` <= 0: no
    clipping, the norm is still measured), step, zero the gradients, advance the
    schedule. Returns the gradient norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float("inf"))
    if not scaler and not torch.isfinite(gnorm):  # (AMP's scaler skips such steps itself)
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(
            f"the gradient norm is {float(gnorm)} (training diverged; the weights and the last checkpoint were kept)"
        )
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return gnorm
