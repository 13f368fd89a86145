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

Validation images (and training images with --cache-embeddings) go through the frozen
recall tower once, on the --backend engine (auto: ONNX Runtime on a CPU, exported once
per recall model and checked against torch).

Before any work: CSVs (readable, UTF-8, not empty; NaN/inf CTRs refused with file and
line), image directories, --init, --arch, POI tables and bert files are checked and
--out-dir must be writable: a bad one is one line naming it, exit status 2. --out-dir is
locked for the run; temporary files of a killed save are removed when a run starts. A
NaN/inf loss stops the run before any checkpoint takes it. Ctrl-C: one line, exit 130;
the last saved state resumes with --resume.
"""

from __future__ import annotations

from utils.cli import (
    DataError,
    add_common_args,
    check_finite,
    entry_point,
    finite_float,
    input_dir,
    input_file,
    non_negative_float,
    non_negative_int,
    output_dir,
    positive_int,
)

import argparse
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from models import (
    BACKENDS,
    AlignArch,
    AlignModel,
    RecallModel,
    SiameseRanker,
    load_align_model,
    load_ranker,
    load_tokenizer,
    read_checkpoint,
    save_ranker_checkpoint,
    wrap_align,
)
from utils.args import Encoding
from utils.evaluation import pairwise_metrics
from utils.formats import (
    PREPROCESS_MODES,
    PoiTables,
    RankRow,
    index_images,
    iter_rank_csv,
    load_image,
    load_poi_tables,
    pois_text,
)
from utils.hashing import model_hash
from utils.training import (
    ResumableSampler,
    all_mean,
    amp_autocast,
    augment_pil,
    barrier,
    build_optimizer,
    build_scheduler,
    check_finite_loss,
    check_global_batch,
    check_text_file,
    loader_generator,
    open_run,
    optimizer_step,
    progress,
    restore_state,
    run_lock,
    save_checkpoint_and_state,
    seed_everything,
    setup_distributed,
    setup_rank_logging,
    start_run,
    teardown_distributed,
    wrap_ddp,
)

log = logging.getLogger("rank_train")

STATE_FILE, LAST_FILE, BEST_FILE, METRICS_FILE = "train_state.pt", "last.ckpt", "best.ckpt", "metrics.csv"
RESUME_KEYS = (
    "train_csv",
    "batch_size",
    "epochs",
    "lr",
    "optimizer",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "seed",
    "loss",
    "margin",
    "augment",
    "cache_embeddings",
    "clip_grad",
)
VAL_FIELDS = ("accuracy", "auc", "log_loss", "baseline", "n")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rank_train.py",
        description=__doc__.split("\n\n")[0],
        epilog="Formats, outputs and behaviour on errors: the docstring at the top of rank_train.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--train-csv", required=True, help="$record$ training pairs")
    g.add_argument("--val-csv", required=True, help="$record$ validation pairs")
    g.add_argument("--image-dir", required=True, help="folder of <item_id>_a/_b image files")
    g.add_argument("--val-image-dir", help="folder of the validation images (default --image-dir)")
    g.add_argument(
        "--poi-pic-num",
        "--pic-num",
        help="POI pic-num table (name -> [n0, n1, n2]); without it every POI weighs 0 and the CSV order is kept",
    )
    g.add_argument("--poi-image-vectors", "--img-vectors", help="POI mean image vector table; without it: zero vectors")
    g.add_argument("--poi-name-vectors", "--name-vectors", help="POI name vector table; without it: zero vectors")
    g.add_argument("--trust-pickle", action="store_true", help="read .npy tables with plain np.load(allow_pickle=True)")
    g.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no rotation/flip of training images")
    g.add_argument(
        "--cache-embeddings", action="store_true", help="encode each training image once (needs --no-augment)"
    )
    g = p.add_argument_group("model")
    g.add_argument("--bert-dir", required=True, help="directory with config.json and vocab.txt")
    g.add_argument("--init", help="recall checkpoint (new ranker head) or ranker checkpoint")
    g.add_argument("--arch", help="architecture JSON for a non-default recall variant")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image engine of the frozen recall tower for the images encoded once "
        "(validation images, and training images with --cache-embeddings): auto = "
        "ONNX Runtime on a CPU when installed and it agrees with torch (exported once "
        "per recall model, cached), else torch. Augmented training images go "
        "through torch inside the training step",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", choices=("bce", "margin"), default="bce")
    g.add_argument("--margin", type=finite_float, default=0.5, help="margin of --loss margin")
    g.add_argument("--epochs", type=positive_int, default=10)
    g.add_argument("--batch-size", type=positive_int, default=16, help="GLOBAL batch of pairs")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default="adam")
    g.add_argument("--lr", type=non_negative_float, default=1e-3)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    g.add_argument("--warmup-steps", type=non_negative_int, default=0)
    g.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    g.add_argument("--clip-grad", type=non_negative_float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g = p.add_argument_group("run")
    g.add_argument(
        "--out-dir",
        required=True,
        help="checkpoints, training state, metrics (locked for the run: a second run into it stops)",
    )
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    g.add_argument("--save-every", type=non_negative_int, default=0, help="also save every N steps")
    g.add_argument("--stop-after-step", type=non_negative_int, default=0, help="save and stop after this step")
    g.add_argument("--eval-batch-size", type=positive_int, default=32)
    g.add_argument(
        "--num-workers",
        "--workers",
        dest="num_workers",
        type=non_negative_int,
        default=2,
        help="DataLoader worker processes",
    )
    add_common_args(g)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.augment and args.cache_embeddings:
        p.error(
            "--cache-embeddings needs --no-augment: augmented images differ every epoch, "
            "so their vectors cannot be cached"
        )
    return args


def check_paths(args) -> AlignArch | None:
    """Every input readable and the output directory writable, before any work; returns
    the --arch architecture (None without --arch)."""
    check_text_file(args.train_csv, "--train-csv")
    check_text_file(args.val_csv, "--val-csv")
    input_dir(args.image_dir, "--image-dir")
    if args.val_image_dir:
        input_dir(args.val_image_dir, "--val-image-dir")
    input_dir(args.bert_dir, "--bert-dir")
    for name in ("config.json", "vocab.txt"):
        input_file(Path(args.bert_dir) / name, "--bert-dir")
    for opt in ("init", "poi_pic_num", "poi_image_vectors", "poi_name_vectors"):
        if getattr(args, opt):
            input_file(getattr(args, opt), "--" + opt.replace("_", "-"))
    output_dir(args.out_dir, "--out-dir")
    if not args.arch:
        return None
    return AlignArch.from_json(args.arch)


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
    """(row, image a, image b) of every record whose two images exist; CTRs must be
    finite (a NaN would decide the label silently)."""
    images = index_images(image_dir)
    out, missing, n = [], [], 0
    for row in iter_rank_csv(csv_path):
        n += 1
        check_finite(row.ctr_a, f"{csv_path}:{row.line}: ctr_a")
        check_finite(row.ctr_b, f"{csv_path}:{row.line}: ctr_b")
        a, b = images.get(row.key_a), images.get(row.key_b)
        if a is None or b is None:
            missing.append(f"{csv_path}:{row.line}: {row.key_a if a is None else row.key_b}.*")
            continue
        out.append((row, str(a), str(b)))
    if not n:
        raise DataError(f"{csv_path}: no records")
    if missing:
        log.warning(
            "%s: %d pairs skipped, image file absent (first: %s)", csv_path, len(missing), "; ".join(missing[:3])
        )
    if not out:
        raise DataError(f"{csv_path}: no pair has both images in {image_dir}")
    return out


def read_data(args, world_size: int):
    """Training and validation (row, image a, image b); a training set too small for one
    batch is refused."""
    train_rows = read_pairs(args.train_csv, args.image_dir)
    val_rows = read_pairs(args.val_csv, args.val_image_dir or args.image_dir)
    if len(train_rows) // world_size < args.batch_size // world_size:
        raise DataError(f"{args.train_csv}: {len(train_rows)} training pairs cannot fill a batch of {args.batch_size}")
    return train_rows, val_rows


def load_tables(args, dim: int) -> PoiTables:
    """The three POI tables (each optional: a missing one is empty)."""
    tables = load_poi_tables(
        args.poi_pic_num, args.poi_image_vectors, args.poi_name_vectors, dim=dim, trust_pickle=args.trust_pickle
    )
    if not (tables.image_vectors and tables.name_vectors):
        log.warning("no POI image/name vector table given: POI vectors are zero")
    return tables


class PairDataset(Dataset):
    """Item i: image a, image b (tensors, or indices into cached vectors), the item's POI
    inputs, the index of its pois_feature vector and the label."""

    def __init__(
        self,
        records: list[PairRecord],
        tables: PoiTables,
        mode: str,
        augment: bool,
        seed: int,
        image_index: dict | None = None,
    ):
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
        return (
            self._image(r.path_a, i, 0),
            self._image(r.path_b, i, 1),
            torch.from_numpy(item.poi_img),
            torch.from_numpy(item.poi_txt),
            torch.tensor(item.poi_len),
            torch.tensor(r.text_index),
            torch.tensor(float(r.row.label)),
        )


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
        return e[: len(a)], e[len(a) :]

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


def build_ranker(args, arch: AlignArch | None) -> SiameseRanker:
    """A new ranker head around --init's recall model, or --init's whole ranker."""
    if not args.init:
        log.warning("no --init: the frozen recall model is RANDOM (speed tests only)")
        return SiameseRanker(AlignModel.from_bert_dir(args.bert_dir, arch or AlignArch()))
    sd, _ = read_checkpoint(args.init)
    if any(k.startswith("align_model.") for k in sd):
        del sd
        log.info("initialised from ranker checkpoint %s (head and recall model)", args.init)
        return load_ranker(args.init, args.bert_dir, arch=arch)
    del sd
    log.info("recall model from %s; new ranker head", args.init)
    return SiameseRanker(load_align_model(args.init, args.bert_dir, arch=arch))


def load_model(args, arch, out: Path, state: dict | None, device) -> SiameseRanker:
    """The ranker of the saved state (--resume), else ``build_ranker``; on ``device``,
    its recall model frozen in eval mode."""
    if state is not None:
        ranker = load_ranker(out / LAST_FILE, args.bert_dir)
        if model_hash(ranker) != state["model_hash"]:
            raise DataError(
                f"{out / LAST_FILE} does not hold the weights of {out / STATE_FILE} "
                f"(step {state['step']}): restart without --resume"
            )
        log.info("resuming at step %d (epoch %d, batch %d)", state["step"], state["epoch"] + 1, state["batch_in_epoch"])
    else:
        ranker = build_ranker(args, arch)
    ranker.to(device)
    for p in ranker.align_model.parameters():
        p.requires_grad_(False)
    ranker.align_model.eval()
    return ranker


# ---------------------------------------------------------------------------
# frozen recall tower: texts and (un-augmented) images encoded once
# ---------------------------------------------------------------------------
@dataclass
class Encoded:
    text_table: torch.Tensor  # pois_feature vectors (device)
    text_index: dict  # pois string -> row
    val_table: torch.Tensor  # validation image vectors (device)
    val_index: dict  # path -> row
    train_table: torch.Tensor | None  # --cache-embeddings
    train_index: dict | None


def encode_once(rm: RecallModel, train_rows, val_rows, args, env) -> Encoded:
    """pois_feature per distinct string; validation images, and with --cache-embeddings
    the training images, through the frozen tower on the chosen engine (--backend)."""
    device = env.device
    texts = list(dict.fromkeys(pois_text(r.title, r.poi_names) for r, _, _ in train_rows + val_rows))
    enc = Encoding(
        preprocess=args.preprocess,
        batch_size=args.eval_batch_size,
        text_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        progress=env.is_main and not args.no_progress,
    )
    text_table = rm.encode_texts(texts, replace(enc, progress=False)).to(device)
    log.info("%d train pairs, %d val pairs, %d distinct pois_feature texts", len(train_rows), len(val_rows), len(texts))
    val_paths = list(dict.fromkeys(p for _, a, b in val_rows for p in (a, b)))
    train_paths = list(dict.fromkeys(p for _, a, b in train_rows for p in (a, b))) if args.cache_embeddings else []
    if env.distributed and env.is_main:
        rm.image_encoder()  # rank 0 exports (if need be) before the others load the export
    barrier(env)
    vecs, ok = rm.encode_images(val_paths + train_paths, enc, desc="frozen image tower")
    contiguous(rm.model)
    if not ok.all():
        log.warning("%d images unreadable (zero image used, as the authors did)", int((~ok).sum()))
    vecs = vecs.to(device)
    return Encoded(
        text_table,
        {t: i for i, t in enumerate(texts)},
        vecs[: len(val_paths)],
        {p: i for i, p in enumerate(val_paths)},
        vecs[len(val_paths) :] if args.cache_embeddings else None,
        {p: i for i, p in enumerate(train_paths)} if args.cache_embeddings else None,
    )


def contiguous(align: AlignModel) -> None:
    """Undo the channels_last layout utils.embed.encode_images leaves behind."""
    align.image_model.to(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
@torch.no_grad()
def validate(scorer: PairScorer, dataset: PairDataset, labels: np.ndarray, batch_size: int, device) -> dict:
    was = scorer.training
    scorer.eval()
    sa, sb = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, generator=loader_generator(0))
    for batch in loader:
        a, b, *rest, _ = (t.to(device) for t in batch)
        s_a, s_b = scorer(a, b, *rest)
        sa.append(s_a.float().cpu())
        sb.append(s_b.float().cpu())
    scorer.train(was)
    return pairwise_metrics(labels, torch.cat(sa).numpy(), torch.cat(sb).numpy())


# ---------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------
@dataclass
class Run:
    """What the loop works with."""

    args: argparse.Namespace
    env: object
    out: Path
    ranker: SiameseRanker
    model: nn.Module  # the training PairScorer, in DDP under torchrun
    train_set: PairDataset
    sampler: ResumableSampler
    loader: DataLoader
    local_bs: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    trainable: list
    val_scorer: PairScorer
    val_set: PairDataset
    val_labels: np.ndarray
    config: dict
    metrics: object = None
    step: int = 0
    best: float = -1.0

    def save(self, epoch: int, batch_in_epoch: int) -> None:
        """last.ckpt + train_state.pt (resumes at batch ``batch_in_epoch`` of ``epoch``)."""
        save_checkpoint_and_state(
            self.ranker,
            save_ranker_checkpoint,
            self.out,
            self.env,
            model_file=LAST_FILE,
            state_file=STATE_FILE,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            step=self.step,
            epoch=epoch,
            batch_in_epoch=batch_in_epoch,
            metrics=self.metrics,
            config=self.config,
            best=self.best,
        )


def make_run(args, env, out, config, ranker, tables, enc: Encoded, train_rows, val_rows) -> Run:
    """Datasets, loader, DDP wrapper, optimizer and schedule."""
    device = env.device

    def records(rows):
        return [PairRecord(r, a, b, enc.text_index[pois_text(r.title, r.poi_names)]) for r, a, b in rows]

    val_set = PairDataset(records(val_rows), tables, args.preprocess, False, args.seed, enc.val_index)
    val_labels = np.array([r.label for r, _, _ in val_rows])
    train_set = PairDataset(records(train_rows), tables, args.preprocess, args.augment, args.seed, enc.train_index)
    scorer = PairScorer(ranker, enc.text_table, enc.train_table)
    val_scorer = PairScorer(ranker, enc.text_table, enc.val_table)
    local_bs = args.batch_size // env.world_size
    sampler = ResumableSampler(train_set, env, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(
        train_set,
        batch_size=local_bs,
        sampler=sampler,
        drop_last=True,
        num_workers=0 if args.cache_embeddings else args.num_workers,
        generator=loader_generator(args.seed),
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = sampler.num_samples // local_bs
    total_steps = steps_per_epoch * args.epochs
    optimizer = build_optimizer(
        [(n, p) for n, p in ranker.named_parameters() if not n.startswith("align_model.")],
        args.optimizer,
        args.lr,
        args.weight_decay,
    )
    scheduler = build_scheduler(optimizer, min(args.warmup_steps, total_steps), total_steps, args.schedule)
    amp = device.type == "cuda" and not args.no_amp
    scaler = torch.amp.GradScaler("cuda") if amp else None
    trainable = [p for p in ranker.parameters() if p.requires_grad]
    log.info(
        "%d trainable values; %d steps per epoch x %d epochs; global batch %d on %d "
        "process(es); loss %s; augmentation %s; training images %s; device %s",
        sum(p.numel() for p in trainable),
        steps_per_epoch,
        args.epochs,
        args.batch_size,
        env.world_size,
        args.loss,
        "on" if args.augment else "off",
        "cached" if args.cache_embeddings else "encoded each step",
        device,
    )
    return Run(
        args,
        env,
        out,
        ranker,
        wrap_ddp(scorer, env),
        train_set,
        sampler,
        loader,
        local_bs,
        steps_per_epoch,
        optimizer,
        scheduler,
        scaler,
        trainable,
        val_scorer,
        val_set,
        val_labels,
        config,
    )


def train_step(r: Run, batch, autocast) -> tuple[float, float, float]:
    """One optimizer step: (lr, loss, grad norm)."""
    args, env = r.args, r.env
    lr = r.optimizer.param_groups[0]["lr"]
    a, b, poi_img, poi_txt, poi_len, text_idx, label = (t.to(env.device, non_blocking=True) for t in batch)
    with autocast():
        s_a, s_b = r.model(a, b, poi_img, poi_txt, poi_len, text_idx)
        loss = pair_loss(s_a.float(), s_b.float(), label, args.loss, args.margin)
    (r.scaler.scale(loss) if r.scaler else loss).backward()
    loss_val = check_finite_loss(
        all_mean(float(loss.detach()), env), r.step + 1, "; try a lower --lr or --clip-grad, then --resume"
    )
    gnorm = optimizer_step(r.optimizer, r.scheduler, r.scaler, r.trainable, args.clip_grad)
    r.step += 1
    return lr, loss_val, float(gnorm)


def validate_epoch(r: Run, epoch: int) -> None:
    """Validation accuracy, AUC, log loss (rank 0); best.ckpt when the accuracy improves."""
    res = validate(r.val_scorer, r.val_set, r.val_labels, r.args.eval_batch_size, r.env.device)
    r.metrics.write(step=r.step, epoch=epoch + 1, split="val", **{k: res[k] for k in VAL_FIELDS})
    log.info(
        "epoch %d (step %d): val accuracy %.4f (constant guess %.4f), AUC %s, log loss %.4f",
        epoch + 1,
        r.step,
        res["accuracy"],
        res["baseline"],
        "n/a" if res["auc"] is None else f"{res['auc']:.4f}",
        res["log_loss"],
    )
    if res["accuracy"] > r.best:
        r.best = res["accuracy"]
        save_ranker_checkpoint(r.ranker, r.out / BEST_FILE)
        log.info("new best val accuracy %.4f -> %s", r.best, r.out / BEST_FILE)


def train_loop(r: Run, start_epoch: int, start_batch: int) -> bool:
    """Epochs from (start_epoch, start_batch) on; saves as asked; True when
    --stop-after-step stopped it."""
    args, env = r.args, r.env
    autocast = amp_autocast(r.scaler is not None)
    for epoch in range(start_epoch, args.epochs):
        first = start_batch if epoch == start_epoch else 0
        r.sampler.set_epoch(epoch)
        r.sampler.set_start(first * r.local_bs)
        r.train_set.set_epoch(epoch)
        r.model.train()
        it = iter(r.loader)
        bar = progress(
            total=r.steps_per_epoch, initial=first, env=env, desc=f"epoch {epoch + 1}", enabled=not args.no_progress
        )
        for batch_in_epoch in range(first + 1, r.steps_per_epoch + 1):
            t0 = time.perf_counter()
            lr, loss, gnorm = train_step(r, next(it), autocast)
            r.metrics.write(
                step=r.step,
                epoch=epoch + 1,
                split="train",
                loss=loss,
                lr=lr,
                grad_norm=gnorm,
                seconds=time.perf_counter() - t0,
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if batch_in_epoch < r.steps_per_epoch:
                if (args.save_every and r.step % args.save_every == 0) or r.step == args.stop_after_step:
                    r.save(epoch, batch_in_epoch)
                if r.step == args.stop_after_step:
                    bar.close()
                    return True
        bar.close()
        if env.is_main:
            validate_epoch(r, epoch)
        barrier(env)
        r.save(epoch + 1, 0)
        if r.step == args.stop_after_step:
            return True
    return False


# ---------------------------------------------------------------------------
# main: parse -> check -> data -> model -> encode -> loop -> save
# ---------------------------------------------------------------------------
def run_training(args, env, arch, train_rows, val_rows) -> None:
    """Everything that writes into --out-dir, under its lock."""
    with run_lock(args.out_dir, env):
        out, config, state = open_run(args, RESUME_KEYS, STATE_FILE)
        seed_everything(args.seed)
        ranker = load_model(args, arch, out, state, env.device)
        tables = load_tables(args, ranker.align_model.arch.embed_dim)
        rm = wrap_align(ranker.align_model, load_tokenizer(args.bert_dir), device=env.device, backend=args.backend)
        enc = encode_once(rm, train_rows, val_rows, args, env)
        r = make_run(args, env, out, config, ranker, tables, enc, train_rows, val_rows)
        fields = ["step", "epoch", "split", "loss", "lr", "grad_norm", "seconds", *VAL_FIELDS]
        r.step, start_epoch, start_batch, r.best = restore_state(state, r.optimizer, r.scheduler, r.scaler, env)
        r.metrics = start_run(out, fields, env, state, args, metrics_file=METRICS_FILE)
        t_start = time.perf_counter()
        stopped = train_loop(r, start_epoch, start_batch)
        if env.is_main:
            log.info(
                "%s after %d steps in %.1f s; best val accuracy %.4f; checkpoints in %s",
                "stopped" if stopped else "done",
                r.step,
                time.perf_counter() - t_start,
                r.best,
                out,
            )


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    arch = check_paths(args)
    env = setup_distributed(args.device)
    try:
        setup_rank_logging(args.log_level, env)
        check_global_batch(args.batch_size, env)
        train_rows, val_rows = read_data(args, env.world_size)
        run_training(args, env, arch, train_rows, val_rows)
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
