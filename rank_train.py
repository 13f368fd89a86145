#!/usr/bin/env python
"""Training of the siamese CTR ranker (stage 2) on $record$ image pairs.

    python rank_train.py --train-csv data/dwd_..._train_with_poi_tuomin.csv \\
        --val-csv data/dwd_..._val_with_poi_tuomin.csv --image-dir data/rank_images \\
        --poi-pic-num data/..._poi_2_pic_num.npy --poi-image-vectors data/..._imgs_avg10_vector.npy \\
        --poi-name-vectors data/..._poi_name_vector.npy --bert-dir data/bert-base-chinese \\
        --init data/align_model.pth --out-dir runs/rank1
    torchrun --nproc_per_node 2 rank_train.py ...same arguments...   # data parallel

Data: each CSV row is one item with images ``<image-dir>/<item_id>_a.<ext>`` and
``_b.<ext>`` (download_images.py names them so); label 1 when ctr_a > ctr_b. Pairs with
an absent image file are skipped (counted in the log). The item inputs follow SPEC 5
(utils.poi.build_item_inputs): POI sequence from the pic-num table, POI image and name
vectors from the two vector tables (read safely by utils.poi; --trust-pickle for
plain np.load), and ``pois_feature`` = the recall text tower's vector of the POI string
(or the title), computed once per distinct string.

Model: models.ranker.SiameseRanker around a recall model that stays frozen and in eval
mode, as the authors trained it. --init takes a recall checkpoint (new ranker head) or
a ranker checkpoint (its head and recall copy are both restored, to continue training).
Without --init the recall model is random (only useful for speed tests).

Loss: binary cross-entropy on sigmoid(s_a - s_b) (default), or --loss margin:
MarginRankingLoss(margin 0.5) on (s_a, s_b, label as +1/-1). Adam at 1e-3, batch 16
(GLOBAL: split over torchrun processes), as the authors; the last incomplete batch of
an epoch is dropped.

Augmentation of training images (the authors' RandomRotation(5) then
RandomHorizontalFlip(0.3), before the resize; utils.train.augment_pil): on by default,
off with --no-augment. Its random numbers depend only on (--seed, epoch, pair, side),
so runs are reproducible and resume exactly. --cache-embeddings (needs --no-augment)
encodes each training image once with the frozen tower, which dominates the cost.
Validation images are never augmented, so they are always encoded once.

Each epoch: validation accuracy (the published 0.652 metric), ROC-AUC and log loss
(utils.metrics). Outputs in --out-dir: ``best.ckpt`` (best val accuracy) and
``last.ckpt`` in the released ranker format (loadable by rank_eval.py /
models.checkpoint.load_ranker; a ``.arch.json`` sidecar for non-default variants),
``train_state.pt`` (--resume), ``metrics.csv``, ``config.json``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from models.align import AlignArch, AlignModel, load_tokenizer
from models.checkpoint import (load_align_model, load_ranker, read_checkpoint,
                               save_ranker_checkpoint)
from utils.hashing import model_hash
from models.ranker import SiameseRanker
from utils.data import DataError, RankRow, index_images, iter_rank_csv
from utils.cli import DEVICE_CHOICES
from utils.embed import encode_images, encode_texts
from utils.images import PREPROCESS_MODES, load_image
from utils.poi import load_poi_tables, pois_text, PoiTables
from utils.metrics import pairwise_metrics
from utils.train import (ResumableSampler, all_mean, amp_autocast, augment_pil, barrier,
                         build_optimizer, build_scheduler, check_global_batch, configure_logging,
                         loader_generator, open_run, optimizer_step, progress, restore_state,
                         save_checkpoint_and_state, seed_everything, setup_distributed,
                         start_run, teardown_distributed, wrap_ddp)

log = logging.getLogger("rank_train")

STATE_FILE, LAST_FILE, BEST_FILE, METRICS_FILE = "train_state.pt", "last.ckpt", "best.ckpt", "metrics.csv"
RESUME_KEYS = ("train_csv", "batch_size", "epochs", "lr", "optimizer", "weight_decay",
               "warmup_steps", "schedule", "seed", "loss", "margin", "augment", "cache_embeddings",
               "clip_grad")
VAL_FIELDS = ("accuracy", "auc", "log_loss", "baseline", "n")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rank_train.py", description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (head -45 rank_train.py) for formats and outputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train-csv", required=True, help="$record$ training pairs")
    g.add_argument("--val-csv", required=True, help="$record$ validation pairs")
    g.add_argument("--image-dir", required=True, help="folder of <item_id>_a/_b image files")
    g.add_argument("--val-image-dir", help="folder of the validation images (default --image-dir)")
    g.add_argument("--poi-pic-num", "--pic-num", help="POI pic-num table (name -> [n0, n1, n2]); without it every "
                   "POI weighs 0 and the CSV order is kept")
    g.add_argument("--poi-image-vectors", "--img-vectors", help="POI mean image vector table; without it: zero vectors")
    g.add_argument("--poi-name-vectors", "--name-vectors", help="POI name vector table; without it: zero vectors")
    g.add_argument("--trust-pickle", action="store_true",
                   help="read .npy tables with plain np.load(allow_pickle=True)")
    g.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no rotation/flip of training images")
    g.add_argument("--cache-embeddings", action="store_true",
                   help="encode each training image once (needs --no-augment)")
    g = p.add_argument_group("model")
    g.add_argument("--bert-dir", required=True, help="directory with config.json and vocab.txt")
    g.add_argument("--init", help="recall checkpoint (new ranker head) or ranker checkpoint")
    g.add_argument("--arch", help="architecture JSON for a non-default recall variant")
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", choices=("bce", "margin"), default="bce")
    g.add_argument("--margin", type=float, default=0.5, help="margin of --loss margin")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=16, help="GLOBAL batch of pairs")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default="adam")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    g.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", required=True)
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    g.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    g.add_argument("--stop-after-step", type=int, default=0, help="save and stop after this step")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    g.add_argument("--verbose", action="store_true")
    return p


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PairRecord:
    row: RankRow
    path_a: str
    path_b: str
    text_index: int  # row of pois_feature in the text-vector table


def read_pairs(csv_path: str, image_dir: str) -> list[tuple[RankRow, str, str]]:
    images = index_images(image_dir)
    out, missing = [], []
    for row in iter_rank_csv(csv_path):
        a, b = images.get(row.key_a), images.get(row.key_b)
        if a is None or b is None:
            missing.append(f"{csv_path}:{row.line}: {row.key_a if a is None else row.key_b}.*")
            continue
        out.append((row, str(a), str(b)))
    if missing:
        log.warning("%s: %d pairs skipped, image file absent (first: %s)", csv_path, len(missing),
                    "; ".join(missing[:3]))
    if not out:
        raise DataError(f"{csv_path}: no pair has both images in {image_dir}")
    return out


def load_tables(args, dim: int) -> PoiTables:
    """The three POI tables (each optional: a missing one is empty)."""
    tables = load_poi_tables(args.poi_pic_num, args.poi_image_vectors, args.poi_name_vectors,
                             dim=dim, trust_pickle=args.trust_pickle)
    if not (tables.image_vectors and tables.name_vectors):
        log.warning("no POI image/name vector table given: POI vectors are zero")
    return tables


class PairDataset(Dataset):
    """Item i: image a, image b (tensors, or indices into cached vectors), the item's POI
    inputs, the index of its pois_feature vector and the label."""

    def __init__(self, records: list[PairRecord], tables: PoiTables, mode: str, augment: bool,
                 seed: int, image_index: dict | None = None):
        self.records, self.tables, self.mode = records, tables, mode
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.image_index = image_index  # path -> row of the cached vectors

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, path: str, i: int, side: int):
        if self.image_index is not None:
            return torch.tensor(self.image_index[path])
        transform = None
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i, side])
            transform = lambda im: augment_pil(im, rng)  # noqa: E731
        return load_image(path, self.mode, transform)[0]

    def __getitem__(self, i: int):
        r = self.records[i]
        item = self.tables.inputs(r.row.title, r.row.poi_names)
        return (self._image(r.path_a, i, 0), self._image(r.path_b, i, 1),
                torch.from_numpy(item.poi_img), torch.from_numpy(item.poi_txt),
                torch.tensor(item.poi_len), torch.tensor(r.text_index),
                torch.tensor(float(r.row.label)))


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
class PairScorer(nn.Module):
    """The module DDP wraps: (s_a, s_b) of a batch of pairs. The recall model stays
    frozen in eval mode; ``image_table`` holds cached image vectors, ``text_table``
    the pois_feature vectors."""

    def __init__(self, ranker: SiameseRanker, text_table: torch.Tensor, image_table=None):
        super().__init__()
        self.ranker = ranker
        self.text_table, self.image_table = text_table, image_table

    def train(self, mode: bool = True):
        super().train(mode)
        self.ranker.align_model.eval()
        return self

    def embed(self, a, b):
        if self.image_table is not None:
            return self.image_table[a], self.image_table[b]
        with torch.no_grad():
            e = self.ranker.align_model.encode_image(torch.cat([a, b]))
        return e[:len(a)], e[len(a):]

    def forward(self, a, b, poi_img, poi_txt, poi_len, text_idx):
        ea, eb = self.embed(a, b)
        feat = self.text_table[text_idx]
        s_a = self.ranker.score_embeddings(ea, feat, poi_img, poi_txt, poi_len)
        s_b = self.ranker.score_embeddings(eb, feat, poi_img, poi_txt, poi_len)
        return s_a.squeeze(1), s_b.squeeze(1)


def pair_loss(s_a, s_b, label, kind: str, margin: float) -> torch.Tensor:
    if kind == "bce":  # BCE(sigmoid(s_a - s_b), label), computed stably
        return F.binary_cross_entropy_with_logits(s_a - s_b, label)
    return F.margin_ranking_loss(s_a, s_b, label * 2 - 1, margin=margin)


def build_ranker(args) -> SiameseRanker:
    if not args.init:
        arch = AlignArch.from_json(args.arch) if args.arch else AlignArch()
        log.warning("no --init: the frozen recall model is RANDOM (speed tests only)")
        return SiameseRanker(AlignModel.from_bert_dir(args.bert_dir, arch))
    sd, _ = read_checkpoint(args.init)
    if any(k.startswith("align_model.") for k in sd):
        del sd
        log.info("initialised from ranker checkpoint %s (head and recall model)", args.init)
        return load_ranker(args.init, args.bert_dir, arch=args.arch)
    del sd
    log.info("recall model from %s; new ranker head", args.init)
    return SiameseRanker(load_align_model(args.init, args.bert_dir, arch=args.arch))


def contiguous(ranker: SiameseRanker) -> None:
    """Undo the channels_last layout utils.embed.encode_images leaves behind."""
    ranker.align_model.image_model.to(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
@torch.no_grad()
def validate(scorer: PairScorer, dataset: PairDataset, labels: np.ndarray, batch_size: int,
             device) -> dict:
    was = scorer.training
    scorer.eval()
    sa, sb = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                        generator=loader_generator(0))
    for batch in loader:
        a, b, *rest, _ = (t.to(device) for t in batch)
        s_a, s_b = scorer(a, b, *rest)
        sa.append(s_a.float().cpu())
        sb.append(s_b.float().cpu())
    scorer.train(was)
    return pairwise_metrics(labels, torch.cat(sa).numpy(), torch.cat(sb).numpy())


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.augment and args.cache_embeddings:
        raise SystemExit("--cache-embeddings needs --no-augment: augmented images differ every "
                         "epoch, so their vectors cannot be cached")
    env = setup_distributed(args.device)
    try:
        return run(args, env)
    finally:
        teardown_distributed()


def run(args, env) -> int:
    configure_logging(env, args.verbose)
    device = env.device
    check_global_batch(args.batch_size, env)
    out, config, state = open_run(args, RESUME_KEYS, STATE_FILE)
    amp = device.type == "cuda" and not args.no_amp
    seed_everything(args.seed)

    train_rows = read_pairs(args.train_csv, args.image_dir)
    val_rows = read_pairs(args.val_csv, args.val_image_dir or args.image_dir)
    local_bs = args.batch_size // env.world_size
    if len(train_rows) // env.world_size < local_bs:
        raise SystemExit(f"{len(train_rows)} training pairs cannot fill a batch of {args.batch_size}")

    if state is not None:
        ranker = load_ranker(out / LAST_FILE, args.bert_dir)
        if model_hash(ranker) != state["model_hash"]:
            raise SystemExit(f"{out / LAST_FILE} does not hold the weights of {out / STATE_FILE} "
                             f"(step {state['step']}): restart without --resume")
        log.info("resuming at step %d (epoch %d, batch %d)", state["step"], state["epoch"] + 1,
                 state["batch_in_epoch"])
    else:
        ranker = build_ranker(args)
    ranker.to(device)
    align = ranker.align_model
    for p in align.parameters():
        p.requires_grad_(False)
    align.eval()
    tables = load_tables(args, align.arch.embed_dim)

    # pois_feature: one text-tower vector per distinct string, computed once
    texts = list(dict.fromkeys(pois_text(r.title, r.poi_names) for r, _, _ in train_rows + val_rows))
    text_table = encode_texts(align, load_tokenizer(args.bert_dir), texts,
                              batch_size=args.eval_batch_size, device=device).to(device)
    text_index = {t: i for i, t in enumerate(texts)}
    log.info("%d train pairs, %d val pairs, %d distinct pois_feature texts", len(train_rows),
             len(val_rows), len(texts))

    def records(rows):
        return [PairRecord(r, a, b, text_index[pois_text(r.title, r.poi_names)]) for r, a, b in rows]

    # frozen tower, no augmentation: validation images once; training images with --cache
    val_paths = list(dict.fromkeys(p for _, a, b in val_rows for p in (a, b)))
    train_paths = list(dict.fromkeys(p for _, a, b in train_rows for p in (a, b))) \
        if args.cache_embeddings else []
    vecs, ok = encode_images(align, val_paths + train_paths, batch_size=args.eval_batch_size,
                             device=device, mode=args.preprocess, num_workers=args.workers,
                             progress=env.is_main, desc="frozen image tower")
    contiguous(ranker)
    if not ok.all():
        log.warning("%d images unreadable (zero image used, as the authors did)", int((~ok).sum()))
    vecs = vecs.to(device)
    val_table, train_table = vecs[:len(val_paths)], vecs[len(val_paths):]
    val_set = PairDataset(records(val_rows), tables, args.preprocess, False, args.seed,
                          {p: i for i, p in enumerate(val_paths)})
    val_labels = np.array([r.label for r, _, _ in val_rows])
    train_set = PairDataset(records(train_rows), tables, args.preprocess, args.augment, args.seed,
                            {p: i for i, p in enumerate(train_paths)} if args.cache_embeddings else None)

    scorer = PairScorer(ranker, text_table, train_table if args.cache_embeddings else None)
    val_scorer = PairScorer(ranker, text_table, val_table)
    model = wrap_ddp(scorer, env)

    sampler = ResumableSampler(train_set, env, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=local_bs, sampler=sampler, drop_last=True,
                        num_workers=0 if args.cache_embeddings else args.workers,
                        generator=loader_generator(args.seed), pin_memory=device.type == "cuda")
    steps_per_epoch = sampler.num_samples // local_bs
    total_steps = steps_per_epoch * args.epochs
    optimizer = build_optimizer([(n, p) for n, p in ranker.named_parameters()
                                 if not n.startswith("align_model.")],
                                args.optimizer, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, min(args.warmup_steps, total_steps), total_steps,
                                args.schedule)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    trainable = [p for p in ranker.parameters() if p.requires_grad]
    log.info("%d trainable values; %d steps per epoch x %d epochs; global batch %d on %d "
             "process(es); loss %s; augmentation %s; training images %s; device %s",
             sum(p.numel() for p in trainable), steps_per_epoch, args.epochs, args.batch_size,
             env.world_size, args.loss, "on" if args.augment else "off",
             "cached" if args.cache_embeddings else "encoded each step", device)

    fields = ["step", "epoch", "split", "loss", "lr", "grad_norm", "seconds", *VAL_FIELDS]
    step, start_epoch, start_batch, best = restore_state(state, optimizer, scheduler, scaler, env)
    metrics = start_run(out, fields, env, state, args, metrics_file=METRICS_FILE)

    def save(epoch: int, batch_in_epoch: int) -> None:
        save_checkpoint_and_state(ranker, save_ranker_checkpoint, out, env, model_file=LAST_FILE,
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
        sampler.set_start(first * local_bs)
        train_set.set_epoch(epoch)
        model.train()
        it = iter(loader)
        bar = progress(total=steps_per_epoch, initial=first, env=env, desc=f"epoch {epoch + 1}")
        for batch_in_epoch in range(first + 1, steps_per_epoch + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            a, b, poi_img, poi_txt, poi_len, text_idx, label = (
                t.to(device, non_blocking=True) for t in next(it))
            with autocast():
                s_a, s_b = model(a, b, poi_img, poi_txt, poi_len, text_idx)
                loss = pair_loss(s_a.float(), s_b.float(), label, args.loss, args.margin)
            (scaler.scale(loss) if scaler else loss).backward()
            gnorm = optimizer_step(optimizer, scheduler, scaler, trainable, args.clip_grad)
            step += 1
            loss_val = all_mean(float(loss.detach()), env)
            metrics.write(step=step, epoch=epoch + 1, split="train", loss=loss_val, lr=lr,
                          grad_norm=float(gnorm), seconds=time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}")
            if batch_in_epoch < steps_per_epoch and (
                    (args.save_every and step % args.save_every == 0) or step == args.stop_after_step):
                save(epoch, batch_in_epoch)
            if step == args.stop_after_step and batch_in_epoch < steps_per_epoch:
                stopped = True
                break
        bar.close()
        if stopped:
            break
        if env.is_main:
            res = validate(val_scorer, val_set, val_labels, args.eval_batch_size, device)
            metrics.write(step=step, epoch=epoch + 1, split="val", **{k: res[k] for k in VAL_FIELDS})
            log.info("epoch %d (step %d): val accuracy %.4f (constant guess %.4f), AUC %s, "
                     "log loss %.4f", epoch + 1, step, res["accuracy"], res["baseline"],
                     "n/a" if res["auc"] is None else f"{res['auc']:.4f}", res["log_loss"])
            if res["accuracy"] > best:
                best = res["accuracy"]
                save_ranker_checkpoint(ranker, out / BEST_FILE)
                log.info("new best val accuracy %.4f -> %s", best, out / BEST_FILE)
        barrier(env)
        save(epoch + 1, 0)
        if step == args.stop_after_step:
            stopped = True
            break
    if env.is_main:
        log.info("%s after %d steps in %.1f s; best val accuracy %.4f; checkpoints in %s",
                 "stopped" if stopped else "done", step, time.perf_counter() - t_start, best, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
