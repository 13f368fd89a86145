"""The training loop of both trainers: ``train`` runs a ``TrainConfig`` and a ``Task``. An epoch ends
with validation on rank 0, the best checkpoint, then the last with the state ``--resume`` continues.
``run_training``: a trainer's run, under torchrun or not."""

from __future__ import annotations

from utils.cli import DataError, UserError, input_file

import contextlib
import csv
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from utils.args import Encoding
from utils.hashing import model_hash
from utils.io import atomic_path, atomic_write, text_lines, write_json

from .dist import DistEnv, deferred_sigint, distributed, out_dir_lock

log = logging.getLogger(__name__)

STATE_FILE, METRICS_FILE, STATE_FORMAT = "train_state.pt", "metrics.csv", 1
HINT = "training diverged; try a lower --lr or --clip-grad, then --resume"
# the options of both trainers a --resume must not change; each adds its own (TrainConfig.resume_keys)
RESUME_KEYS = "batch_size epochs lr weight_decay warmup_steps schedule seed clip_grad cache_embeddings".split()


@dataclass(frozen=True)
class TrainConfig:
    """The settings of a run (``from_options``: from the flags)."""

    out_dir: Path
    epochs: int
    batch_size: int  # GLOBAL: split over the torchrun processes
    lr: float
    optimizer: str = "adamw"  # or "adam"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # or "constant"
    clip_grad: float = 0.0  # max gradient norm (0: off)
    accum_steps: int = 1
    amp: bool = True  # fp16 autocast + gradient scaling, on CUDA only
    seed: int = 0
    resume: bool = False
    save_every: int = 0  # also save every N steps (0: per epoch)
    stop_after_step: int = 0  # save and stop after this step (0: never)
    eval_every: int = 1
    num_workers: int = 2  # DataLoader worker processes
    progress: bool = True
    last_file: str = "last.pth"
    best_file: str = "best.pth"
    options: dict = field(default_factory=dict)  # every option of the run: config.json
    resume_keys: tuple[str, ...] = ()  # the options a --resume must not change besides RESUME_KEYS

    @classmethod
    def from_options(cls, options: dict, **override) -> TrainConfig:
        """From a script's ``vars(namespace)``; None keeps a default."""
        values = {f.name: options[f.name] for f in fields(cls) if options.get(f.name) is not None}
        values |= {"amp": not options.get("no_amp"), "progress": not options.get("no_progress"), "options": options}
        if options.get("cache_embeddings"):  # the batches are row numbers: nothing to decode
            values["num_workers"] = 0
        return cls(**(values | override))


@dataclass
class Task:
    """What a trainer brings to the loop besides the model."""

    module: torch.nn.Module  # a batch runs through it (wrapped in DDP under torchrun)
    dataset: Dataset  # may have set_epoch(epoch) (seeded augmentation) and collate(items) -> batch
    loss: Callable  # loss(module, batch) -> scalar; batch: the collated tensors, on the device
    save: Callable  # save(model, path): the checkpoint in its published format
    validate: Callable | None = None  # validate() -> {val field: value}, run on rank 0
    select: str = ""  # the val field whose maximum picks the best checkpoint
    step_fields: Callable = dict  # step_fields() -> {column: value} added to a training row
    val_fields: tuple[str, ...] = ()  # the val row's columns: what validate() returns beyond them is left out


def train(cfg: TrainConfig, env: DistEnv, load_model: Callable, make_task: Callable) -> dict:
    """One run into ``cfg.out_dir``; a summary. ``load_model(path)`` gives the model on the device
    (``path``: the last checkpoint on resume, else None), ``make_task(model)`` the rest."""
    out, t0 = Path(cfg.out_dir), time.perf_counter()
    with out_dir_lock(out, env):
        config = {k: cfg.options[k] for k in (*RESUME_KEYS, *cfg.resume_keys) if k in cfg.options}
        state = load_train_state(out / STATE_FILE) if cfg.resume else None
        if state is not None:
            saved = state.get("config", {})
            diff = ", ".join(f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in config.items() if saved.get(k) != v)
            if diff:
                raise UserError(f"{out / STATE_FILE}: cannot resume: settings differ from the interrupted run ({diff})")
        torch.manual_seed(cfg.seed)
        model = load_model(out / cfg.last_file if state is not None else None)
        if state is not None and model_hash(model) != state["model_hash"]:
            why = f"does not hold the weights of {out / STATE_FILE}: the run was interrupted while saving"
            raise DataError(f"{out / cfg.last_file} {why}; restart it without --resume")
        run = _Run(cfg, env, model, make_task(model), state, config)
        stopped = run.epochs()
        if env.is_main and run.task.validate is None:
            run.task.save(model, out / cfg.best_file)  # nothing to select by: the last
    best = run.best if run.task.validate else None
    summary = {"steps": run.step, "stopped": stopped, "best": best, "seconds": round(time.perf_counter() - t0, 1)}
    log.info("%s: %s; checkpoints in %s", "stopped" if stopped else "done", summary, out)
    return summary | {"out_dir": str(out), "processes": env.world_size}


def run_training(ns, read_pairs, load_model, make_task, **config) -> dict:
    """A trainer's run of ``TrainConfig.from_options(vars(ns), **config)`` once ``--bert-dir`` holds config.json
    and vocab.txt, under torchrun or not: ``read_pairs(ns)`` -> (train, val, {csv: bad rows}, training CSV first);
    refused before work when the processes cannot share a batch or the pairs cannot fill a step; then :func:`train`
    with ``load_model(ns, device, resume_from)``, ``make_task(ns, env, encoding, train, val, model)`` (encoding:
    the engine flags at ``--eval-batch-size``, progress bars on rank 0)."""
    for name in ("config.json", "vocab.txt"):
        input_file(Path(ns.bert_dir) / name, "--bert-dir")
    cfg = TrainConfig.from_options(vars(ns), **config)
    with distributed(ns.device, ns.log_level) as env:
        train_pairs, val_pairs, skipped = read_pairs(ns)
        n, world, step = len(train_pairs), env.world_size, f"{cfg.batch_size} x {cfg.accum_steps}"
        if cfg.batch_size % world:
            raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
        if n // world < cfg.batch_size // world * cfg.accum_steps:
            raise DataError(f"{next(iter(skipped))}: {n} training pairs cannot fill one step of {step}")
        batches = {"batch_size": ns.eval_batch_size, "text_batch_size": ns.eval_batch_size}
        enc = Encoding.from_args(ns, **batches, progress=env.is_main and not ns.no_progress)
        task = functools.partial(make_task, ns, env, enc, train_pairs, val_pairs)
        summary = train(cfg, env, functools.partial(load_model, ns, env.device), task)
    for path, bad in skipped.items():
        if bad:
            log.info("%d bad rows of %s were left out (--skip-bad-rows)", bad, path)
    return summary


def warmup_schedule(step: int, warmup: int, total: int, kind: str = "cosine") -> float:
    """The LR factor of ``step``: linear warm-up, then cosine decay to 0 at ``total`` (or constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def read_metrics(path) -> list[dict]:
    return list(csv.DictReader(text_lines(path)))


class MetricsWriter:
    """Rows appended to a CSV by rank 0; on resume the ``keep_rows`` the state counted are kept."""

    def __init__(self, path, fields: list[str], env: DistEnv, keep_rows: int | None = None):
        self.path, self.fields, self.env, self.rows = str(path), list(fields), env, 0
        if not env.is_main:
            return
        old = read_metrics(self.path)[:keep_rows] if keep_rows is not None and os.path.exists(self.path) else []
        if keep_rows is not None and len(old) < keep_rows:
            log.warning("%s: holds %d rows, the training state expected %d", self.path, len(old), keep_rows)
        with atomic_write(self.path) as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
        self.rows = len(old)

    def write(self, **row) -> None:
        if not self.env.is_main:
            return
        with open(self.path, "a", encoding="utf-8", newline="") as f:  # one line a step, not a rewrite
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
        self.rows += 1


def load_train_state(path) -> dict:
    """The state ``train`` saves; a missing, damaged or foreign file is a ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no training state to resume from (was --out-dir the directory of an earlier run?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle with code
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = getattr(e, "strerror", None) or why  # torch reports some truncated files as an OSError
        raise UserError(f"{path}: cannot be read as a training state ({why}); start again without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not a training state file of this package")
    return state


class _Run:
    """A run under way: DDP, optimizer, schedule and metrics of a task."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, model, task: Task, state: dict | None, config: dict):
        self.cfg, self.env, self.model, self.task, self.config = cfg, env, model, task, config
        self.out = Path(cfg.out_dir)
        self.per_process = cfg.batch_size // env.world_size
        self.steps_per_epoch = len(task.dataset) // env.world_size // self.per_process // cfg.accum_steps
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise UserError("no trainable parameters (is everything frozen?)")
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:  # AdamW: no decay for biases, norms and scalars
            decay = [p for p in self.trainable if p.ndim >= 2]
            rest = [p for p in self.trainable if p.ndim < 2]
            groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
            self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
        total = self.steps_per_epoch * cfg.epochs
        schedule = lambda step: warmup_schedule(step, min(cfg.warmup_steps, total), total, cfg.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and env.device.type == "cuda")
        self.ddp = task.module
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(task.module, device_ids=ids)
        self.step, self.best, self.start_epoch, self.start_batch = 0, -math.inf, 0, 0
        if state is not None:
            for part in ("optimizer", "scheduler", "scaler"):
                if state[part]:  # a disabled scaler saved nothing
                    getattr(self, part).load_state_dict(state[part])
            self.step, self.start_epoch, self.start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
            self.best = state["extra"].get("best", -math.inf)
            log.info("resuming at step %d (epoch %d, batch %d)", self.step, self.start_epoch + 1, self.start_batch)
        elif env.is_main:
            record = json.loads(json.dumps(cfg.options | {"world_size": env.world_size}, default=str))
            write_json(self.out / "config.json", record)
        extra = list(task.step_fields())
        columns = ["step", "epoch", "split", "loss", "lr", "grad_norm", *extra, "seconds", *task.val_fields]
        keep = state["metrics_rows"] if state is not None else None
        self.metrics = MetricsWriter(self.out / METRICS_FILE, columns, env, keep_rows=keep)
        size = f"{sum(p.numel() for p in self.trainable) / 1e6:.2f} M trainable values"
        batch = f"batch {cfg.batch_size} x {cfg.accum_steps} on {env.world_size} process(es), {env.device}"
        batch += ", fp16" if self.scaler.is_enabled() else ""
        log.info("%s; %d steps per epoch x %d; %s", size, self.steps_per_epoch, cfg.epochs, batch)

    def epochs(self) -> bool:
        """Train from where the run stands; True when ``stop_after_step`` stopped it."""
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.train_epoch(epoch, self.start_batch if epoch == self.start_epoch else 0):
                return True
            due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            if self.task.validate is not None and due and self.env.is_main:
                res = {k: v for k, v in self.task.validate().items() if k in self.task.val_fields}
                self.metrics.write(step=self.step, epoch=epoch + 1, split="val", **res)
                figures = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
                log.info("epoch %d (step %d): %s", epoch + 1, self.step, figures)
                if res[self.task.select] > self.best:
                    self.best = res[self.task.select]
                    self.task.save(self.model, self.out / self.cfg.best_file)
                    log.info("new best %s %.4f -> %s", self.task.select, self.best, self.out / self.cfg.best_file)
            self.env.barrier()
            self.save(epoch + 1, 0)
            if self.step == cfg.stop_after_step:
                return True
        return False

    def train_epoch(self, epoch: int, first: int) -> bool:
        """The steps of ``epoch`` from batch ``first`` on; True when stopped inside it."""
        cfg, env, task = self.cfg, self.env, self.task
        # process r takes positions r, r + W, ...: the processes' k-th batches together are one global batch
        mine = DistributedSampler(task.dataset, env.world_size, env.rank, seed=cfg.seed, drop_last=True)
        mine.set_epoch(epoch)
        if hasattr(task.dataset, "set_epoch"):
            task.dataset.set_epoch(epoch)
        loader = DataLoader(
            task.dataset,
            batch_size=self.per_process,
            sampler=list(mine)[first * cfg.accum_steps * self.per_process :],
            num_workers=cfg.num_workers,
            collate_fn=getattr(task.dataset, "collate", None),
            generator=torch.Generator(),  # never draws from the RNG dropout uses
            pin_memory=env.device.type == "cuda",
        )
        batches = iter(loader)
        self.ddp.train()
        per_epoch, off = self.steps_per_epoch, not cfg.progress or not env.is_main
        steps = range(first + 1, per_epoch + 1)
        bar = tqdm(steps, initial=first, total=per_epoch, desc=f"epoch {epoch + 1}", disable=off, leave=False)
        for batch_in_epoch in bar:
            t0 = time.perf_counter()
            lr, loss, gnorm = self.train_step(batches)
            row = {"step": self.step, "epoch": epoch + 1, "split": "train", "loss": loss, "lr": lr}
            self.metrics.write(**row, grad_norm=gnorm, seconds=time.perf_counter() - t0, **task.step_fields())
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if batch_in_epoch == per_epoch:
                break  # the epoch's end saves
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.stop_after_step:
                self.save(epoch, batch_in_epoch)
            if self.step == cfg.stop_after_step:
                return True
        return False

    def train_step(self, batches) -> tuple[float, float, float]:
        """One optimizer step: (lr, loss, gradient norm before clipping); stops before a NaN/inf."""
        cfg, env, scaler = self.cfg, self.env, self.scaler
        lr, total = self.optimizer.param_groups[0]["lr"], 0.0
        # dropout draws from (seed, step) only: a resumed run draws what an uninterrupted one
        # does, with no RNG state to save (the data order and augmentation are seeded apart)
        torch.manual_seed(hash((cfg.seed, self.step)))
        for micro in range(cfg.accum_steps):
            batch = tuple(t.to(env.device, non_blocking=True) for t in next(batches))
            sync = micro == cfg.accum_steps - 1 or not env.distributed
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast("cuda", dtype=torch.float16, enabled=scaler.is_enabled()):
                    loss = self.task.loss(self.ddp, batch) / cfg.accum_steps
                scaler.scale(loss).backward()
            total += float(loss.detach())
        loss = env.mean(total)  # the same on every process: all stop together
        if not math.isfinite(loss):
            raise UserError(f"step {self.step + 1}: the loss is {loss} (the last checkpoint was kept); {HINT}")
        scaler.unscale_(self.optimizer)
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.clip_grad or math.inf))
        if not math.isfinite(gnorm) and not scaler.is_enabled():  # the scaler skips such a step itself
            raise UserError(f"step {self.step + 1}: the gradient norm is {gnorm} (the weights were kept); {HINT}")
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return lr, loss, gnorm

    def save(self, epoch: int, batch_in_epoch: int) -> None:
        """The last checkpoint, then the state resuming at ``batch_in_epoch`` of ``epoch`` (rank 0)."""
        with deferred_sigint():
            if self.env.is_main:
                self.task.save(self.model, self.out / self.cfg.last_file)
                state = {"format": STATE_FORMAT, "world_size": self.env.world_size, "config": self.config}
                state |= {"step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
                state |= {"metrics_rows": self.metrics.rows, "model_hash": model_hash(self.model)}
                state |= {part: getattr(self, part).state_dict() for part in ("optimizer", "scheduler", "scaler")}
                with atomic_path(self.out / STATE_FILE) as tmp:
                    torch.save(state | {"model_file": self.cfg.last_file, "extra": {"best": self.best}}, tmp)
            self.env.barrier()
