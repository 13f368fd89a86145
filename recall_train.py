#!/usr/bin/env python
"""Contrastive training of the recall (alignment) model on (text, image) pairs.

    python recall_train.py --csv data/train_recall.csv --image-dir data/recall_images \\
        --bert-dir data/bert-base-chinese --init data/align_model.pth --out-dir runs/recall1
    torchrun --nproc_per_node 2 recall_train.py ...same arguments...   # data parallel

Input CSV, one of:
  - the recall format (no header: poi_id, poi_name, image_url, rank_number, width, height,
    extend); each image ``<image-dir>/<poi_id>_<rank_number>.<ext>`` is paired with its
    POI name; the owner of a pair is its poi_id;
  - a plain CSV with a header holding ``text`` and ``image`` (and optionally ``owner``;
    default: the text); ``image`` is a path, relative ones taken from --image-dir
    (default: the CSV's directory).
Rows whose image file is absent are skipped (counted in the log).

Held-out split: a seeded random ``--val-fraction`` of the owners (never their pairs in
training). Each epoch, every held-out (owner, text) query is scored against all held-out
images; recall@K counts a hit when one of the top K images has the query's owner.

Training: symmetric in-batch cross-entropy (models.align.contrastive_loss) with
``sims = image_emb @ text_emb.T * logit_scale``. Under torchrun the embeddings of all
processes are gathered with their gradients, so the negatives span the global batch
and the run matches one process with the same --batch-size (which is GLOBAL: each of W
processes takes batch-size / W). AdamW, linear warm-up then cosine decay, gradient
accumulation (--accum-steps micro-batches per optimizer step; negatives within a
micro-batch), gradient clipping, mixed precision (fp16 + GradScaler) on CUDA.

--freeze image|text keeps a tower (its backbone and projection) fixed, in eval mode.
With --freeze image, --cache-embeddings encodes every image once and trains the text
side against the stored vectors. --bn-eval keeps the image tower's BatchNorm layers
on their running statistics while its weights train (then a multi-process run equals
a single-process one; in training mode BatchNorm normalises each process's own batch).

Outputs in --out-dir: ``last.pth`` and ``best.pth`` (authors' format, loadable by
recall_infer.py / models.checkpoint.load_align_model; best by held-out recall@--select-k),
``train_state.pt`` (optimizer, scheduler, scaler, step, RNG states; --resume continues
from it exactly), ``metrics.csv`` (one row per optimizer step, one per evaluation),
``config.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from models.align import AlignArch, AlignModel, contrastive_loss, load_tokenizer
from utils.embed import tokenize
from models.checkpoint import load_align_model, save_align_checkpoint
from utils.hashing import model_hash
from utils.data import DataError, index_images, iter_recall_csv
from utils.cli import DEVICE_CHOICES
from utils.embed import encode_images, encode_texts
from utils.images import PREPROCESS_MODES, load_image
from utils.metrics import recall_at_k
from utils.train import (ResumableSampler, all_mean, amp_autocast, barrier, build_optimizer,
                         build_scheduler, check_global_batch, configure_logging, gather_with_grad,
                         loader_generator, open_run, optimizer_step, progress, restore_state,
                         save_checkpoint_and_state, seed_everything, setup_distributed,
                         start_run, teardown_distributed, wrap_ddp)

log = logging.getLogger("recall_train")

STATE_FILE, LAST_FILE, BEST_FILE, METRICS_FILE = "train_state.pt", "last.pth", "best.pth", "metrics.csv"
# settings that must not change between an interrupted run and its --resume
RESUME_KEYS = ("csv", "init", "logit_scale", "batch_size", "accum_steps", "epochs", "lr", "weight_decay", "warmup_steps",
               "schedule", "seed", "val_fraction", "val_owners", "freeze", "bn_eval",
               "cache_embeddings", "clip_grad")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"K values must be >= 1, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall_train.py", description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (head -50 recall_train.py) for formats and outputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--csv", required=True, help="training pairs: recall-format CSV or a CSV with "
                   "a text,image header")
    g.add_argument("--image-dir", help="image directory (recall format: required; plain format: "
                   "base of relative paths, default the CSV's directory)")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of owners (POIs) held out for evaluation")
    g.add_argument("--val-owners", type=int, default=None,
                   help="number of owners held out (overrides --val-fraction; 0: no evaluation)")
    g.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference",
                   help="image preprocessing (utils.images)")
    g = p.add_argument_group("model")
    g.add_argument("--bert-dir", required=True, help="directory with bert-base-chinese "
                   "config.json and vocab.txt")
    g.add_argument("--init", help="start from this recall checkpoint (e.g. the released "
                   "align_model.pth); default: random initialisation (from scratch)")
    g.add_argument("--arch", help="architecture JSON (models.align.AlignArch) for a "
                   "non-default variant; a checkpoint's own record is used otherwise")
    g.add_argument("--logit-scale", type=float, default=None,
                   help="initial logit_scale when training from scratch (the architecture's "
                   "default is 1.0; a plain multiplier of cosine similarities in [-1, 1], so "
                   "from scratch 10 or more lets the loss go down)")
    g.add_argument("--freeze", choices=("none", "image", "text"), default="none",
                   help="keep this tower fixed (eval mode, no gradients)")
    g.add_argument("--bn-eval", action="store_true",
                   help="image tower BatchNorm uses running statistics while training")
    g.add_argument("--cache-embeddings", action="store_true",
                   help="with --freeze image: encode each image once and reuse the vectors")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--batch-size", type=int, default=32,
                   help="GLOBAL micro-batch (the in-batch negatives), split over processes")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="micro-batches accumulated per optimizer step")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="LR after warm-up")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", required=True, help="checkpoints, training state, metrics")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its train_state.pt")
    g.add_argument("--save-every", type=int, default=0,
                   help="also save checkpoint + state every N optimizer steps (0: per epoch)")
    g.add_argument("--stop-after-step", type=int, default=0,
                   help="save and stop after this optimizer step (0: run all epochs)")
    g.add_argument("--recall-k", type=_ks, default=[1, 5, 10], help="K values of recall@K")
    g.add_argument("--eval-every", type=int, default=1,
                   help="evaluate every N epochs (and after the last)")
    g.add_argument("--select-k", type=int, default=5, help="best.pth maximises held-out recall@K")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    g.add_argument("--verbose", action="store_true")
    return p


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    text: str
    image: str
    owner: str
    line: int


def _is_plain(path: str) -> bool:
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f):
            if row and any(x.strip() for x in row):
                names = [x.strip().lower() for x in row]
                return "text" in names and "image" in names
    raise DataError(f"{path}: empty file")


def read_pairs(csv_path: str, image_dir: str | None) -> list[Pair]:
    """(text, image, owner) pairs of a recall-format or plain text,image CSV; rows whose
    image is absent are skipped with a log line."""
    if not os.path.isfile(csv_path):
        raise DataError(f"{csv_path}: no such file")
    pairs, missing = [], []
    if _is_plain(csv_path):
        base = Path(image_dir) if image_dir else Path(csv_path).resolve().parent
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [x.strip().lower() for x in reader.fieldnames]
            for row in reader:
                line = reader.line_num
                text, image = (row.get("text") or "").strip(), (row.get("image") or "").strip()
                if not text and not image:
                    continue
                if not text or not image:
                    raise DataError(f"{csv_path}:{line}: empty text or image")
                path = Path(image) if os.path.isabs(image) else base / image
                if not path.is_file():
                    missing.append(f"{csv_path}:{line}: {path}")
                    continue
                pairs.append(Pair(text, str(path), (row.get("owner") or "").strip() or text, line))
    else:
        if not image_dir:
            raise SystemExit(f"{csv_path}: recall-format CSV: --image-dir (the folder of "
                             f"<poi_id>_<rank>.<ext> files) is required")
        images = index_images(image_dir)
        for row in iter_recall_csv(csv_path):
            if not row.poi_name.strip():
                raise DataError(f"{csv_path}:{row.line}: empty poi_name")
            path = images.get(row.key)
            if path is None:
                missing.append(f"{csv_path}:{row.line}: {row.key}.*")
                continue
            pairs.append(Pair(row.poi_name.strip(), str(path), row.poi_id, row.line))
    if missing:
        log.warning("%d rows skipped, image file absent (first: %s)", len(missing),
                    "; ".join(missing[:3]))
    if not pairs:
        raise DataError(f"{csv_path}: no row has an image file (image dir: {image_dir})")
    return pairs


def split_owners(pairs: list[Pair], val_fraction: float, val_owners: int | None,
                 seed: int) -> tuple[list[Pair], list[Pair]]:
    owners = sorted({p.owner for p in pairs})
    n_val = val_owners if val_owners is not None else int(round(val_fraction * len(owners)))
    if not 0 <= n_val < len(owners):
        raise SystemExit(f"cannot hold out {n_val} of {len(owners)} owners")
    rng = np.random.default_rng(seed)
    held = {owners[i] for i in rng.permutation(len(owners))[:n_val]}
    return [p for p in pairs if p.owner not in held], [p for p in pairs if p.owner in held]


class PairDataset(Dataset):
    """Item i: (image tensor, or index into cached vectors, and pair index)."""

    def __init__(self, pairs: list[Pair], mode: str, cached: bool):
        self.pairs, self.mode, self.cached = pairs, mode, cached

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        if self.cached:
            return torch.tensor(i), i
        x, _ = load_image(self.pairs[i].image, self.mode)
        return x, i


class Collate:
    def __init__(self, pairs: list[Pair], tokenizer):
        self.pairs, self.tokenizer = pairs, tokenizer

    def __call__(self, batch):
        xs, idx = zip(*batch)
        enc = tokenize(self.tokenizer, [self.pairs[i].text for i in idx])
        return torch.stack(xs), enc["input_ids"], enc["attention_mask"]


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
class PairEncoder(nn.Module):
    """The module DDP wraps: normalised (image, text) embeddings of a batch."""

    def __init__(self, align: AlignModel, freeze: str, bn_eval: bool, image_table=None):
        super().__init__()
        self.align, self.freeze, self.bn_eval = align, freeze, bn_eval
        self.image_table = image_table  # cached vectors (not a parameter / buffer)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            if self.freeze == "image":
                self.align.image_model.eval()
            elif self.bn_eval:
                for m in self.align.image_model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            if self.freeze == "text":
                self.align.text_model.eval()
        return self

    def forward(self, images, input_ids, attention_mask):
        a = self.align
        if self.image_table is not None:
            img = self.image_table[images]
        elif self.freeze == "image":
            with torch.no_grad():
                img = a.encode_image(images)
        else:
            img = a.encode_image(images)
        if self.freeze == "text":
            with torch.no_grad():
                txt = a.encode_text(input_ids, attention_mask)
        else:
            txt = a.encode_text(input_ids, attention_mask)
        return img, txt


def set_trainable(align: AlignModel, freeze: str) -> None:
    for p in align.parameters():
        p.requires_grad_(True)
    # the pooler is part of the checkpoint but not of the model's output
    for p in align.text_model.pooler.parameters():
        p.requires_grad_(False)
    frozen = {"image": (align.image_model, align.image_hidden_layer),
              "text": (align.text_model, align.text_hidden_layer)}.get(freeze, ())
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)


def build_model(args, bert_dir: str) -> AlignModel:
    if args.init:
        if args.logit_scale is not None:
            raise SystemExit("--logit-scale sets the initial value of a model trained from "
                             "scratch; with --init the checkpoint's value is used")
        model = load_align_model(args.init, bert_dir, arch=args.arch)
        log.info("initialised from %s", args.init)
    else:
        arch = AlignArch.from_json(args.arch) if args.arch else AlignArch()
        model = AlignModel.from_bert_dir(bert_dir, arch)
        if args.logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.fill_(args.logit_scale)
        log.info("random initialisation (from scratch), arch %s, logit_scale %.3g", arch.to_dict(),
                 float(model.logit_scale.detach()))
    return model


def contiguous(align: AlignModel) -> None:
    """Undo the channels_last layout utils.embed.encode_images leaves on the image
    tower, so every process trains with the same memory layout (and DDP's gradient
    buckets keep matching the parameters)."""
    align.image_model.to(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
def evaluate(align: AlignModel, tokenizer, val: list[Pair], args, device, image_vecs=None) -> dict:
    """Held-out text->image recall@K: every (owner, text) query against all held-out images."""
    queries = list(dict.fromkeys((p.owner, p.text) for p in val))
    if image_vecs is None:
        image_vecs, _ = encode_images(align, [p.image for p in val], batch_size=args.eval_batch_size,
                                      device=device, mode=args.preprocess,
                                      num_workers=args.workers, progress=False, desc="held-out")
        contiguous(align)
    txt = encode_texts(align, tokenizer, [t for _, t in queries], batch_size=args.eval_batch_size,
                       device=device)
    scores = txt @ image_vecs.T
    rec = recall_at_k(scores, [o for o, _ in queries], [p.owner for p in val], args.recall_k)
    return {f"recall@{k}": v for k, v in rec.items()} | {"queries": len(queries), "gallery": len(val)}


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    env = setup_distributed(args.device)
    try:
        return run(args, env)
    finally:
        teardown_distributed()


def run(args, env) -> int:
    configure_logging(env, args.verbose)
    device = env.device
    if args.cache_embeddings and args.freeze != "image":
        raise SystemExit("--cache-embeddings needs --freeze image (cached vectors of a tower "
                         "that trains would be stale)")
    check_global_batch(args.batch_size, env)
    if args.select_k not in args.recall_k:
        args.recall_k = sorted(set(args.recall_k) | {args.select_k})
    out, config, state = open_run(args, RESUME_KEYS, STATE_FILE)
    amp = device.type == "cuda" and not args.no_amp
    seed_everything(args.seed)

    pairs = read_pairs(args.csv, args.image_dir)
    train, val = split_owners(pairs, args.val_fraction, args.val_owners, args.seed)
    log.info("%d pairs (%d owners): %d for training, %d held out (%d owners)", len(pairs),
             len({p.owner for p in pairs}), len(train), len(val), len({p.owner for p in val}))
    local_bs = args.batch_size // env.world_size
    if len(train) // env.world_size < local_bs * args.accum_steps:
        raise SystemExit(f"{len(train)} training pairs cannot fill one step of "
                         f"{args.batch_size} x {args.accum_steps} pairs")

    tokenizer = load_tokenizer(args.bert_dir)
    if state is not None:  # the model of the saved state, in the authors' format
        align = load_align_model(out / LAST_FILE, args.bert_dir)
        if model_hash(align) != state["model_hash"]:
            raise SystemExit(f"{out / LAST_FILE} does not hold the weights of {out / STATE_FILE} "
                             f"(saved at step {state['step']}); the run was interrupted while "
                             f"saving: restart it without --resume")
        log.info("resuming at step %d (epoch %d, batch %d)", state["step"], state["epoch"] + 1,
                 state["batch_in_epoch"])
    else:
        align = build_model(args, args.bert_dir)
    align.to(device)
    set_trainable(align, args.freeze)

    image_table = val_vecs = None
    if args.cache_embeddings:
        vecs, ok = encode_images(align, [p.image for p in train + val], batch_size=args.eval_batch_size,
                                 device=device, mode=args.preprocess, num_workers=args.workers,
                                 progress=env.is_main, desc="frozen image tower")
        if not ok.all():
            log.warning("%d images unreadable (zero image used)", int((~ok).sum()))
        contiguous(align)
        image_table, val_vecs = vecs[:len(train)].to(device), vecs[len(train):]
    encoder = PairEncoder(align, args.freeze, args.bn_eval, image_table)
    model = wrap_ddp(encoder, env)

    dataset = PairDataset(train, args.preprocess, image_table is not None)
    sampler = ResumableSampler(dataset, env, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=local_bs, sampler=sampler, drop_last=True,
                        num_workers=0 if image_table is not None else args.workers,
                        collate_fn=Collate(train, tokenizer), generator=loader_generator(args.seed),
                        pin_memory=device.type == "cuda", persistent_workers=False)
    steps_per_epoch = (sampler.num_samples // local_bs) // args.accum_steps
    total_steps = steps_per_epoch * args.epochs
    optimizer = build_optimizer(align.named_parameters(), "adamw", args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, min(args.warmup_steps, total_steps), total_steps,
                                args.schedule)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    trainable = [p for p in align.parameters() if p.requires_grad]
    log.info("%d trainable tensors (%.2f M values); %d steps per epoch x %d epochs; global batch "
             "%d x %d accumulation on %d process(es), device %s%s", len(trainable),
             sum(p.numel() for p in trainable) / 1e6, steps_per_epoch, args.epochs, args.batch_size,
             args.accum_steps, env.world_size, device, ", fp16 autocast" if amp else "")

    fields = ["step", "epoch", "split", "loss", "lr", "grad_norm", "logit_scale", "seconds"] + \
        [f"recall@{k}" for k in args.recall_k] + ["queries", "gallery"]
    step, start_epoch, start_batch, best = restore_state(state, optimizer, scheduler, scaler, env)
    metrics = start_run(out, fields, env, state, args, metrics_file=METRICS_FILE)

    def save(epoch: int, batch_in_epoch: int) -> None:
        save_checkpoint_and_state(align, save_align_checkpoint, out, env, model_file=LAST_FILE,
                                  state_file=STATE_FILE, optimizer=optimizer, scheduler=scheduler,
                                  scaler=scaler, step=step, epoch=epoch,
                                  batch_in_epoch=batch_in_epoch, metrics=metrics, config=config,
                                  best=best)

    autocast = amp_autocast(amp)
    stopped = False
    t_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        first = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch)
        sampler.set_start(first * args.accum_steps * local_bs)
        model.train()
        it = iter(loader)
        bar = progress(total=steps_per_epoch, initial=first, env=env, desc=f"epoch {epoch + 1}")
        for batch_in_epoch in range(first + 1, steps_per_epoch + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = 0.0
            for micro in range(args.accum_steps):
                images, ids, mask = (t.to(device, non_blocking=True) for t in next(it))
                sync = micro == args.accum_steps - 1 or not env.distributed
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast():
                        img, txt = model(images, ids, mask)
                        img, txt = gather_with_grad(img.float(), env), gather_with_grad(txt.float(), env)
                        loss = contrastive_loss(encoder.align.similarity(img, txt)) / args.accum_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += float(loss.detach())
            gnorm = optimizer_step(optimizer, scheduler, scaler, trainable, args.clip_grad)
            step += 1
            loss_val = all_mean(loss_sum, env)
            metrics.write(step=step, epoch=epoch + 1, split="train", loss=loss_val, lr=lr,
                          grad_norm=float(gnorm), logit_scale=float(align.logit_scale.detach()),
                          seconds=time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
            if batch_in_epoch < steps_per_epoch and (
                    (args.save_every and step % args.save_every == 0) or step == args.stop_after_step):
                save(epoch, batch_in_epoch)
            if step == args.stop_after_step and batch_in_epoch < steps_per_epoch:
                stopped = True
                break
        bar.close()
        if stopped:
            break
        due = (epoch + 1) % max(1, args.eval_every) == 0 or epoch + 1 == args.epochs
        if val and due and env.is_main:
            res = evaluate(align, tokenizer, val, args, device, val_vecs)
            metrics.write(step=step, epoch=epoch + 1, split="val", **res)
            log.info("epoch %d (step %d): held-out %s", epoch + 1, step,
                     ", ".join(f"recall@{k} {res[f'recall@{k}']:.3f}" for k in args.recall_k))
            if res[f"recall@{args.select_k}"] > best:
                best = res[f"recall@{args.select_k}"]
                save_align_checkpoint(align, out / BEST_FILE)
                log.info("new best held-out recall@%d %.4f -> %s", args.select_k, best, out / BEST_FILE)
        barrier(env)
        save(epoch + 1, 0)
        if step == args.stop_after_step:
            stopped = True
            break
    if env.is_main:
        if not val:
            save_align_checkpoint(align, out / BEST_FILE)  # nothing to select by: the last
        log.info("%s after %d steps in %.1f s; checkpoints in %s", "stopped" if stopped else "done",
                 step, time.perf_counter() - t_start, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
