"""Seeds and a resumable data order, the optimizer and its schedule, one optimizer step
(AMP, clipping) and the divergence check."""

from __future__ import annotations

from utils.cli import UserError

import math
import random

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from .dist import DistEnv


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start after its first ``start`` samples (of
    this process), so a resumed run sees exactly the batches it had not seen.

    The permutation depends only on the seed and the epoch; process ``r`` takes positions
    ``r, r + W, ...``, so the processes' k-th batches together are the k-th batch of one
    process with a ``W`` times larger batch."""

    def __init__(self, dataset, env: DistEnv, seed: int = 0):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay; biases, norms and scalars get none) or Adam, over the
    ``(name, parameter)`` pairs that require gradients."""
    params = [(n, p) for n, p in params if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters (is everything frozen?)")
    if name == "adam":
        return torch.optim.Adam([p for _, p in params], lr=lr, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}")
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


class WarmupSchedule:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``
    at ``total`` steps (or constant with ``kind='constant'``)."""

    def __init__(self, warmup: int, total: int, kind: str = "cosine", min_ratio: float = 0.0):
        if kind not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.warmup, self.total, self.kind, self.min_ratio = int(warmup), int(total), kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer, warmup: int, total: int, kind: str = "cosine"):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(min(warmup, total), total, kind))


class Diverged(UserError):
    """The loss or the gradients became NaN/inf: training stops before the weights (and
    any checkpoint) take them."""


HINT = "; try a lower --lr or --clip-grad, then --resume"


def check_finite_loss(loss: float, step: int) -> float:
    """``loss`` unless it is NaN/inf (every process sees the same mean loss, so all stop)."""
    if not math.isfinite(loss):
        raise Diverged(
            f"step {step}: the loss is {loss} (training diverged; the last checkpoint was not overwritten){HINT}"
        )
    return loss


def optimizer_step(optimizer, scheduler, scaler, params, clip_grad: float) -> float:
    """Unscale (AMP), clip the gradient norm of ``params`` (``clip_grad`` 0: measured, not
    clipped), step, zero the gradients, advance the schedule; the norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float("inf"))
    if not scaler and not torch.isfinite(gnorm):  # (AMP's scaler skips such steps itself)
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"the gradient norm is {float(gnorm)} (training diverged; the weights and checkpoint were kept)")
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(gnorm)
