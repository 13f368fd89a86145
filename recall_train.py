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

Held-out evaluation and --cache-embeddings encode through models.factory.wrap_align on
the --backend engine: auto puts a frozen image tower (--freeze image) on ONNX Runtime
(exported once, checked against torch) and keeps a training image tower on torch.

Before any work: every input is checked (CSV readable, UTF-8, not empty; directories;
--init; --arch JSON; bert files) and --out-dir writable; a bad one is one line naming
it, exit status 2. --out-dir is locked for the run (a second run into it stops with
"another run holds DIR/.lock (pid N)"); temporary files of a killed save are removed
when a run starts. A NaN/inf loss stops the run before any checkpoint takes it. Ctrl-C:
one line, exit status 130; the last saved state resumes with --resume.
"""

from __future__ import annotations

from utils.cli import (
    DataError,
    add_common_args,
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
import contextlib
import csv
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from models import (
    BACKENDS,
    AlignArch,
    AlignModel,
    RecallModel,
    contrastive_loss,
    load_align_model,
    load_tokenizer,
    save_align_checkpoint,
    tokenize,
    wrap_align,
)
from utils.args import Encoding
from utils.evaluation import recall_at_k
from utils.formats import PREPROCESS_MODES, index_images, iter_recall_csv, load_image
from utils.hashing import model_hash, state_dict_hash
from utils.training import (
    ResumableSampler,
    all_mean,
    amp_autocast,
    barrier,
    build_optimizer,
    build_scheduler,
    check_finite_loss,
    check_global_batch,
    check_text_file,
    gather_with_grad,
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

log = logging.getLogger("recall_train")

STATE_FILE, LAST_FILE, BEST_FILE, METRICS_FILE = "train_state.pt", "last.pth", "best.pth", "metrics.csv"
# settings that must not change between an interrupted run and its --resume
RESUME_KEYS = (
    "csv",
    "init",
    "logit_scale",
    "batch_size",
    "accum_steps",
    "epochs",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "seed",
    "val_fraction",
    "val_owners",
    "freeze",
    "bn_eval",
    "cache_embeddings",
    "clip_grad",
)
IMAGE_PREFIXES = ("image_model.", "image_hidden_layer.")


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


def _fraction(text: str) -> float:
    v = finite_float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall_train.py",
        description=__doc__.split("\n\n")[0],
        epilog="Formats, outputs and behaviour on errors: the docstring at the top of recall_train.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--csv", required=True, help="training pairs: recall-format CSV or a CSV with a text,image header")
    g.add_argument(
        "--image-dir",
        help="image directory (recall format: required; plain format: "
        "base of relative paths, default the CSV's directory)",
    )
    g.add_argument("--val-fraction", type=_fraction, default=0.1, help="share of owners (POIs) held out for evaluation")
    g.add_argument(
        "--val-owners",
        type=non_negative_int,
        default=None,
        help="number of owners held out (overrides --val-fraction; 0: no evaluation)",
    )
    g.add_argument(
        "--preprocess", choices=PREPROCESS_MODES, default="reference", help="image preprocessing (utils.images)"
    )
    g = p.add_argument_group("model")
    g.add_argument("--bert-dir", required=True, help="directory with bert-base-chinese config.json and vocab.txt")
    g.add_argument(
        "--init",
        help="start from this recall checkpoint (e.g. the released "
        "align_model.pth); default: random initialisation (from scratch)",
    )
    g.add_argument(
        "--arch",
        help="architecture JSON (models.align.AlignArch) for a "
        "non-default variant; a checkpoint's own record is used otherwise",
    )
    g.add_argument(
        "--logit-scale",
        type=finite_float,
        default=None,
        help="initial logit_scale when training from scratch (the architecture's "
        "default is 1.0; a plain multiplier of cosine similarities in [-1, 1], so "
        "from scratch 10 or more lets the loss go down)",
    )
    g.add_argument(
        "--freeze",
        choices=("none", "image", "text"),
        default="none",
        help="keep this tower fixed (eval mode, no gradients)",
    )
    g.add_argument(
        "--bn-eval", action="store_true", help="image tower BatchNorm uses running statistics while training"
    )
    g.add_argument(
        "--cache-embeddings",
        action="store_true",
        help="with --freeze image: encode each image once and reuse the vectors",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image engine of the held-out evaluation and --cache-embeddings: auto = "
        "ONNX Runtime on a CPU for a frozen image tower (--freeze image: exported "
        "once, checked against torch), torch for an image tower that trains (its "
        "weights change every epoch, so an export per evaluation rarely pays); onnx "
        "= ONNX Runtime even then (a throw-away export + check per evaluation)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=5)
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="GLOBAL micro-batch (the in-batch negatives), split over processes",
    )
    g.add_argument("--accum-steps", type=positive_int, default=1, help="micro-batches accumulated per optimizer step")
    g.add_argument("--lr", type=non_negative_float, default=5e-5)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    g.add_argument("--warmup-steps", type=non_negative_int, default=100)
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="LR after warm-up")
    g.add_argument("--clip-grad", type=non_negative_float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g = p.add_argument_group("run")
    g.add_argument(
        "--out-dir",
        required=True,
        help="checkpoints, training state, metrics (locked for the run: a second run into it stops)",
    )
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its train_state.pt")
    g.add_argument(
        "--save-every",
        type=non_negative_int,
        default=0,
        help="also save checkpoint + state every N optimizer steps (0: per epoch)",
    )
    g.add_argument(
        "--stop-after-step",
        type=non_negative_int,
        default=0,
        help="save and stop after this optimizer step (0: run all epochs)",
    )
    g.add_argument("--recall-k", type=_ks, default=[1, 5, 10], help="K values of recall@K")
    g.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--select-k", type=positive_int, default=5, help="best.pth maximises held-out recall@K")
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
    if args.cache_embeddings and args.freeze != "image":
        p.error("--cache-embeddings needs --freeze image (cached vectors of a tower that trains would be stale)")
    if args.init and args.logit_scale is not None:
        p.error(
            "--logit-scale sets the initial value of a model trained from scratch; with "
            "--init the checkpoint's value is used"
        )
    if args.select_k not in args.recall_k:
        args.recall_k = sorted(set(args.recall_k) | {args.select_k})
    return args


def check_paths(args) -> AlignArch | None:
    """Every input readable and the output directory writable, before any work; returns
    the --arch architecture (None without --arch)."""
    check_text_file(args.csv, "--csv")
    if args.image_dir:
        input_dir(args.image_dir, "--image-dir")
    input_dir(args.bert_dir, "--bert-dir")
    for name in ("config.json", "vocab.txt"):
        input_file(Path(args.bert_dir) / name, "--bert-dir")
    if args.init:
        input_file(args.init, "--init")
    output_dir(args.out_dir, "--out-dir")
    if not args.arch:
        return None
    return AlignArch.from_json(args.arch)


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
    try:
        plain = _is_plain(csv_path)
    except csv.Error as e:
        raise DataError(f"{csv_path}: unreadable CSV ({e})") from None
    if plain:
        base = Path(image_dir) if image_dir else Path(csv_path).resolve().parent
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [x.strip().lower() for x in reader.fieldnames]
            try:
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
            except csv.Error as e:
                raise DataError(f"{csv_path}:{reader.line_num}: unreadable CSV ({e})") from None
    else:
        if not image_dir:
            raise DataError(
                f"{csv_path}: recall-format CSV: --image-dir (the folder of <poi_id>_<rank>.<ext> files) is required"
            )
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
        log.warning("%d rows skipped, image file absent (first: %s)", len(missing), "; ".join(missing[:3]))
    if not pairs:
        raise DataError(f"{csv_path}: no row has an image file (image dir: {image_dir})")
    return pairs


def split_owners(
    pairs: list[Pair], val_fraction: float, val_owners: int | None, seed: int
) -> tuple[list[Pair], list[Pair]]:
    owners = sorted({p.owner for p in pairs})
    n_val = val_owners if val_owners is not None else int(round(val_fraction * len(owners)))
    if not 0 <= n_val < len(owners):
        raise DataError(f"cannot hold out {n_val} of the {len(owners)} owners (--val-owners / --val-fraction)")
    rng = np.random.default_rng(seed)
    held = {owners[i] for i in rng.permutation(len(owners))[:n_val]}
    return [p for p in pairs if p.owner not in held], [p for p in pairs if p.owner in held]


def read_data(args, world_size: int) -> tuple[list[Pair], list[Pair]]:
    """Training and held-out pairs; a training set too small for one step is refused."""
    pairs = read_pairs(args.csv, args.image_dir)
    train, val = split_owners(pairs, args.val_fraction, args.val_owners, args.seed)
    log.info(
        "%d pairs (%d owners): %d for training, %d held out (%d owners)",
        len(pairs),
        len({p.owner for p in pairs}),
        len(train),
        len(val),
        len({p.owner for p in val}),
    )
    if len(train) // world_size < args.batch_size // world_size * args.accum_steps:
        raise DataError(
            f"{args.csv}: {len(train)} training pairs cannot fill one step of "
            f"{args.batch_size} x {args.accum_steps} pairs"
        )
    return train, val


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
    frozen = {
        "image": (align.image_model, align.image_hidden_layer),
        "text": (align.text_model, align.text_hidden_layer),
    }.get(freeze, ())
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)


def build_model(args, arch: AlignArch | None) -> AlignModel:
    """--init's weights, or a random model (from scratch)."""
    if args.init:
        model = load_align_model(args.init, args.bert_dir, arch=arch)
        log.info("initialised from %s", args.init)
        return model
    arch = arch or AlignArch()
    model = AlignModel.from_bert_dir(args.bert_dir, arch)
    if args.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(args.logit_scale)
    log.info(
        "random initialisation (from scratch), arch %s, logit_scale %.3g",
        arch.to_dict(),
        float(model.logit_scale.detach()),
    )
    return model


def load_model(args, arch, out: Path, state: dict | None, device) -> AlignModel:
    """The model to train: the one of the saved state (--resume), else ``build_model``;
    on ``device``, with the frozen tower's gradients off."""
    if state is not None:  # the model of the saved state, in the authors' format
        align = load_align_model(out / LAST_FILE, args.bert_dir)
        if model_hash(align) != state["model_hash"]:
            raise DataError(
                f"{out / LAST_FILE} does not hold the weights of {out / STATE_FILE} "
                f"(saved at step {state['step']}); the run was interrupted while "
                f"saving: restart it without --resume"
            )
        log.info("resuming at step %d (epoch %d, batch %d)", state["step"], state["epoch"] + 1, state["batch_in_epoch"])
    else:
        align = build_model(args, arch)
    align.to(device)
    set_trainable(align, args.freeze)
    return align


def contiguous(align: AlignModel) -> None:
    """Undo the channels_last layout utils.embed.encode_images leaves on the image
    tower, so every process trains with the same memory layout (and DDP's gradient
    buckets keep matching the parameters)."""
    align.image_model.to(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------
# image engine (issue 13): frozen towers on ONNX Runtime, training towers on torch
# ---------------------------------------------------------------------------
def frozen_image_engine(args, align, tokenizer, device) -> RecallModel | None:
    """With --freeze image the image tower never changes: one ``RecallModel`` for the
    whole run (its engine chosen, and an ONNX export checked, once), keyed by the image
    tower's weights only so a later run from the same --init reuses the export. None when
    the image tower trains."""
    if args.freeze != "image":
        return None
    rm = wrap_align(align, tokenizer, device=device, backend=args.backend)
    rm.hash_fn = lambda: state_dict_hash({k: v for k, v in align.state_dict().items() if k.startswith(IMAGE_PREFIXES)})
    return rm


@contextlib.contextmanager
def training_image_engine(args, align, tokenizer, device):
    """A ``RecallModel`` for one evaluation of an image tower that trains: torch for
    ``auto``; ``onnx`` exports these weights into a temporary directory, removed after."""
    if args.backend != "onnx":
        yield wrap_align(align, tokenizer, device=device, backend="torch")
        return
    with tempfile.TemporaryDirectory(prefix="recall_train-onnx-") as d:
        yield wrap_align(align, tokenizer, device=device, backend="onnx", onnx_cache_dir=d)


def eval_encoding(args, progress: bool) -> Encoding:
    return Encoding(
        preprocess=args.preprocess,
        batch_size=args.eval_batch_size,
        text_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        progress=progress,
    )


def cache_image_vectors(rm: RecallModel, train: list[Pair], val: list[Pair], args, env):
    """--cache-embeddings: every image through the frozen tower once; returns the
    training vectors (on the device) and the held-out ones (CPU)."""
    if env.distributed and env.is_main:
        rm.image_encoder()  # rank 0 exports (if need be) before the others load it
    barrier(env)
    vecs, ok = rm.encode_images(
        [p.image for p in train + val],
        eval_encoding(args, env.is_main and not args.no_progress),
        desc="frozen image tower",
    )
    if not ok.all():
        log.warning("%d images unreadable (zero image used)", int((~ok).sum()))
    contiguous(rm.model)
    return vecs[: len(train)].to(env.device), vecs[len(train) :]


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
def evaluate(rm: RecallModel, val: list[Pair], args, image_vecs=None) -> dict:
    """Held-out text->image recall@K: every (owner, text) query against all held-out images."""
    queries = list(dict.fromkeys((p.owner, p.text) for p in val))
    if image_vecs is None:
        image_vecs, _ = rm.encode_images([p.image for p in val], eval_encoding(args, False), desc="held-out")
        contiguous(rm.model)
    txt = rm.encode_texts([t for _, t in queries], eval_encoding(args, False))
    scores = txt @ image_vecs.T
    rec = recall_at_k(scores, [o for o, _ in queries], [p.owner for p in val], args.recall_k)
    return {f"recall@{k}": v for k, v in rec.items()} | {"queries": len(queries), "gallery": len(val)}


# ---------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------
@dataclass
class Run:
    """What the loop works with."""

    args: argparse.Namespace
    env: object
    out: Path
    align: AlignModel
    tokenizer: object
    encoder: PairEncoder
    model: nn.Module  # encoder, in DDP under torchrun
    sampler: ResumableSampler
    loader: DataLoader
    local_bs: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    trainable: list
    val: list[Pair]
    val_vecs: torch.Tensor | None
    frozen_rm: RecallModel | None
    config: dict
    metrics: object = None
    step: int = 0
    best: float = -1.0

    def save(self, epoch: int, batch_in_epoch: int) -> None:
        """last.pth + train_state.pt (resumes at batch ``batch_in_epoch`` of ``epoch``)."""
        save_checkpoint_and_state(
            self.align,
            save_align_checkpoint,
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


def make_run(args, env, out, config, train, val, align, tokenizer) -> Run:
    """Dataset, loader, DDP wrapper, optimizer, schedule (and the cached image vectors)."""
    device = env.device
    frozen_rm = frozen_image_engine(args, align, tokenizer, device)
    image_table = val_vecs = None
    if args.cache_embeddings:
        image_table, val_vecs = cache_image_vectors(frozen_rm, train, val, args, env)
    encoder = PairEncoder(align, args.freeze, args.bn_eval, image_table)
    local_bs = args.batch_size // env.world_size
    dataset = PairDataset(train, args.preprocess, image_table is not None)
    sampler = ResumableSampler(dataset, env, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=local_bs,
        sampler=sampler,
        drop_last=True,
        num_workers=0 if image_table is not None else args.num_workers,
        collate_fn=Collate(train, tokenizer),
        generator=loader_generator(args.seed),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    steps_per_epoch = (sampler.num_samples // local_bs) // args.accum_steps
    total_steps = steps_per_epoch * args.epochs
    optimizer = build_optimizer(align.named_parameters(), "adamw", args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, min(args.warmup_steps, total_steps), total_steps, args.schedule)
    amp = device.type == "cuda" and not args.no_amp
    scaler = torch.amp.GradScaler("cuda") if amp else None
    trainable = [p for p in align.parameters() if p.requires_grad]
    log.info(
        "%d trainable tensors (%.2f M values); %d steps per epoch x %d epochs; global batch "
        "%d x %d accumulation on %d process(es), device %s%s",
        len(trainable),
        sum(p.numel() for p in trainable) / 1e6,
        steps_per_epoch,
        args.epochs,
        args.batch_size,
        args.accum_steps,
        env.world_size,
        device,
        ", fp16 autocast" if amp else "",
    )
    return Run(
        args,
        env,
        out,
        align,
        tokenizer,
        encoder,
        wrap_ddp(encoder, env),
        sampler,
        loader,
        local_bs,
        steps_per_epoch,
        optimizer,
        scheduler,
        scaler,
        trainable,
        val,
        val_vecs,
        frozen_rm,
        config,
    )


def train_step(r: Run, it, autocast) -> tuple[float, float, float]:
    """One optimizer step over --accum-steps micro-batches: (lr, loss, grad norm)."""
    args, env, device = r.args, r.env, r.env.device
    lr = r.optimizer.param_groups[0]["lr"]
    loss_sum = 0.0
    for micro in range(args.accum_steps):
        images, ids, mask = (t.to(device, non_blocking=True) for t in next(it))
        sync = micro == args.accum_steps - 1 or not env.distributed
        with contextlib.nullcontext() if sync else r.model.no_sync():
            with autocast():
                img, txt = r.model(images, ids, mask)
                img, txt = gather_with_grad(img.float(), env), gather_with_grad(txt.float(), env)
                loss = contrastive_loss(r.align.similarity(img, txt)) / args.accum_steps
            (r.scaler.scale(loss) if r.scaler else loss).backward()
        loss_sum += float(loss.detach())
    loss_val = check_finite_loss(
        all_mean(loss_sum, env), r.step + 1, "; try a lower --lr or --clip-grad, then --resume"
    )
    gnorm = optimizer_step(r.optimizer, r.scheduler, r.scaler, r.trainable, args.clip_grad)
    r.step += 1
    return lr, loss_val, float(gnorm)


def evaluate_epoch(r: Run, epoch: int) -> None:
    """Held-out recall@K (rank 0), best.pth when --select-k's recall improves."""
    args = r.args
    if r.frozen_rm is not None:
        res = evaluate(r.frozen_rm, r.val, args, r.val_vecs)
    else:
        with training_image_engine(args, r.align, r.tokenizer, r.env.device) as rm:
            res = evaluate(rm, r.val, args)
    r.metrics.write(step=r.step, epoch=epoch + 1, split="val", **res)
    log.info(
        "epoch %d (step %d): held-out %s",
        epoch + 1,
        r.step,
        ", ".join(f"recall@{k} {res[f'recall@{k}']:.3f}" for k in args.recall_k),
    )
    if res[f"recall@{args.select_k}"] > r.best:
        r.best = res[f"recall@{args.select_k}"]
        save_align_checkpoint(r.align, r.out / BEST_FILE)
        log.info("new best held-out recall@%d %.4f -> %s", args.select_k, r.best, r.out / BEST_FILE)


def train_loop(r: Run, start_epoch: int, start_batch: int) -> bool:
    """Epochs from (start_epoch, start_batch) on; saves as asked; True when
    --stop-after-step stopped it."""
    args, env = r.args, r.env
    autocast = amp_autocast(r.scaler is not None)
    for epoch in range(start_epoch, args.epochs):
        first = start_batch if epoch == start_epoch else 0
        r.sampler.set_epoch(epoch)
        r.sampler.set_start(first * args.accum_steps * r.local_bs)
        r.model.train()
        it = iter(r.loader)
        bar = progress(
            total=r.steps_per_epoch, initial=first, env=env, desc=f"epoch {epoch + 1}", enabled=not args.no_progress
        )
        for batch_in_epoch in range(first + 1, r.steps_per_epoch + 1):
            t0 = time.perf_counter()
            lr, loss, gnorm = train_step(r, it, autocast)
            r.metrics.write(
                step=r.step,
                epoch=epoch + 1,
                split="train",
                loss=loss,
                lr=lr,
                grad_norm=gnorm,
                logit_scale=float(r.align.logit_scale.detach()),
                seconds=time.perf_counter() - t0,
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if batch_in_epoch < r.steps_per_epoch:
                if (args.save_every and r.step % args.save_every == 0) or r.step == args.stop_after_step:
                    r.save(epoch, batch_in_epoch)
                if r.step == args.stop_after_step:
                    bar.close()
                    return True
        bar.close()
        due = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
        if r.val and due and env.is_main:
            evaluate_epoch(r, epoch)
        barrier(env)
        r.save(epoch + 1, 0)
        if r.step == args.stop_after_step:
            return True
    return False


# ---------------------------------------------------------------------------
# main: parse -> check -> data -> model -> loop -> save
# ---------------------------------------------------------------------------
def run_training(args, env, arch, train_pairs, val_pairs) -> None:
    """Everything that writes into --out-dir, under its lock."""
    with run_lock(args.out_dir, env) as out:
        out, config, state = open_run(args, RESUME_KEYS, STATE_FILE)
        seed_everything(args.seed)
        tokenizer = load_tokenizer(args.bert_dir)
        align = load_model(args, arch, out, state, env.device)
        r = make_run(args, env, out, config, train_pairs, val_pairs, align, tokenizer)
        fields = (
            ["step", "epoch", "split", "loss", "lr", "grad_norm", "logit_scale", "seconds"]
            + [f"recall@{k}" for k in args.recall_k]
            + ["queries", "gallery"]
        )
        r.step, start_epoch, start_batch, r.best = restore_state(state, r.optimizer, r.scheduler, r.scaler, env)
        r.metrics = start_run(out, fields, env, state, args, metrics_file=METRICS_FILE)
        t_start = time.perf_counter()
        stopped = train_loop(r, start_epoch, start_batch)
        if env.is_main:
            if not r.val:
                save_align_checkpoint(align, out / BEST_FILE)  # nothing to select by: the last
            log.info(
                "%s after %d steps in %.1f s; checkpoints in %s",
                "stopped" if stopped else "done",
                r.step,
                time.perf_counter() - t_start,
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
        train_pairs, val_pairs = read_data(args, env.world_size)
        run_training(args, env, arch, train_pairs, val_pairs)
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
