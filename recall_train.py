#!/usr/bin/env python
"""Contrastive training of the recall (alignment) model on (text, image) pairs.

    python recall_train.py --csv data/train_recall.csv --image-dir data/recall_images \\
        --bert-dir data/bert-base-chinese --init data/align_model.pth --out-dir runs/recall1
    torchrun --nproc_per_node 2 recall_train.py ...same arguments...   # --batch-size is global

Symmetric in-batch cross-entropy; under torchrun the embeddings of all processes are
gathered with their gradients, so the run matches one process. --out-dir: last.pth and
best.pth (the authors' format), train_state.pt (--resume), metrics.csv, config.json.
"""

from __future__ import annotations

from utils.cli import entry_point

import argparse
import functools
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import models
from utils import args, cli, training
from utils.hashing import state_dict_hash

log = logging.getLogger("recall_train")

# the settings a --resume must not change besides the training ones
RESUME_KEYS = ("csv", "init", "logit_scale", "accum_steps", "val_fraction", "val_owners", "freeze", "bn_eval")
IMAGE_PREFIXES = ("image_model.", "image_hidden_layer.")


def _ks(text: str) -> list[int]:
    ks = sorted({cli.positive_int(k) for k in text.split(",") if k.strip()})
    if not ks:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recall_train.py", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("data")
    g.add_argument("--csv", required=True, help="pairs: the recall format, or a CSV with a text,image[,owner] header")
    g.add_argument("--image-dir", help="images (recall format: required; else the base of relative paths)")
    g.add_argument("--val-fraction", type=cli.fraction, default=0.1, help="share of owners held out (default 0.1)")
    text = "owners held out (overrides --val-fraction; 0: none)"
    g.add_argument("--val-owners", type=cli.non_negative_int, help=text)
    args.add_bad_rows(g)
    g = args.add_recall_files(p, "model", checkpoint=None)
    g.add_argument("--init", help="start from this recall checkpoint (default: random weights, from scratch)")
    g.add_argument("--logit-scale", type=cli.finite_float, help="from scratch: initial logit_scale (try 10)")
    g.add_argument("--freeze", choices=("none", "image", "text"), default="none", help="keep this tower fixed")
    g.add_argument("--bn-eval", action="store_true", help="image tower BatchNorm on running statistics")
    g.add_argument("--cache-embeddings", action="store_true", help="with --freeze image: encode each image once")
    args.add_training(p, batch_size=32, weight_decay=0.01, warmup_steps=100, schedule="cosine", clip_grad=1.0)
    g = p.add_argument_group("recall training")
    g.add_argument("--epochs", type=cli.positive_int, default=5, help="(default 5)")
    g.add_argument("--lr", type=cli.non_negative_float, default=5e-5, help="peak learning rate (default 5e-5)")
    g.add_argument("--accum-steps", type=cli.positive_int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--recall-k", type=_ks, default=[1, 5, 10], help="K values of recall@K (default 1,5,10)")
    g.add_argument("--eval-every", type=cli.positive_int, default=1, help="validate every N epochs and after the last")
    g.add_argument("--select-k", type=cli.positive_int, default=5, help="best.pth: best held-out recall@K (default 5)")
    args.add_run(p)
    return p


def read_pairs(ns) -> tuple[list, list, dict]:
    pairs, bad = training.read_text_pairs(ns.csv, ns.image_dir, ns.skip_bad_rows)
    train_pairs, val_pairs = training.split_owners(pairs, ns.val_fraction, ns.val_owners, ns.seed)
    log.info("%d pairs: %d for training, %d held out", len(pairs), len(train_pairs), len(val_pairs))
    return train_pairs, val_pairs, {ns.csv: bad}


def load_model(ns, device, resume_from: Path | None, arch: models.AlignArch | None) -> models.AlignModel:
    """The run's last checkpoint (on resume), --init's weights, or random weights."""
    if resume_from is not None:
        align = models.load_align_model(resume_from, ns.bert_dir)
    elif ns.init:
        align = models.load_align_model(ns.init, ns.bert_dir, arch=arch)
        log.info("initialised from %s", ns.init)
    else:
        align = models.AlignModel.from_bert_dir(ns.bert_dir, arch or models.AlignArch())
        if ns.logit_scale is not None:
            torch.nn.init.constant_(align.logit_scale, ns.logit_scale)
        log.info("random initialisation (from scratch), logit_scale %.3g", float(align.logit_scale.detach()))
    return align.to(device)


def make_task(ns, env, enc, train_pairs, val_pairs, align: models.AlignModel) -> training.Task:
    tokenizer = models.load_tokenizer(ns.bert_dir)
    frozen = table = val_vecs = None
    if ns.freeze == "image":  # one engine for the run, its ONNX export keyed by the image tower only
        frozen = models.wrap_align(align, tokenizer, device=env.device, backend=ns.backend)
        image_weights = {k: v for k, v in align.state_dict().items() if k.startswith(IMAGE_PREFIXES)}
        frozen.hash_fn = lambda: state_dict_hash(image_weights)
    if ns.cache_embeddings:
        vecs = training.encode_images_once(frozen, [p.image for p in train_pairs + val_pairs], enc, env)
        table, val_vecs = vecs[: len(train_pairs)].to(env.device), vecs[len(train_pairs) :]

    def validate() -> dict:
        # the frozen engine, else torch under auto (the image tower changes every epoch) or, with
        # --backend onnx, an export into a directory removed after
        backend = "onnx" if ns.backend == "onnx" else "torch"
        with tempfile.TemporaryDirectory(prefix="recall_train-onnx-") as d:
            rm = frozen or models.wrap_align(align, tokenizer, device=env.device, backend=backend, onnx_cache_dir=d)
            return training.held_out_recall(rm, val_pairs, ns.recall_k, replace(enc, progress=False), val_vecs)

    def loss(module, batch):
        img, txt = module(*batch)
        img, txt = env.gather_with_grad(img.float()), env.gather_with_grad(txt.float())
        return models.contrastive_loss(align.similarity(img, txt))

    tokenize = functools.partial(models.tokenize, tokenizer)
    return training.Task(
        module=training.PairEncoder(align, ns.freeze, ns.bn_eval, table),
        dataset=training.TextImageDataset(train_pairs, ns.preprocess, table is not None, tokenize),
        loss=loss,
        save=models.save_align_checkpoint,
        validate=validate if val_pairs else None,
        select=f"recall@{ns.select_k}",
        step_fields=lambda: {"logit_scale": float(align.logit_scale.detach())},
        val_fields=(*(f"recall@{k}" for k in ns.recall_k), "queries", "gallery"),
    )


@entry_point
def main(argv=None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.cache_embeddings and ns.freeze != "image":
        p.error("--cache-embeddings needs --freeze image (cached vectors of a tower that trains would be stale)")
    if ns.init and ns.logit_scale is not None:
        p.error("--logit-scale sets the initial value from scratch; with --init the checkpoint's value is used")
    ns.recall_k = sorted(set(ns.recall_k) | {ns.select_k})
    # inputs readable, --out-dir writable and the --arch architecture read, before any work
    dirs = {"--image-dir": ns.image_dir, "--bert-dir": ns.bert_dir}
    cli.check_files({"--init": ns.init}, dirs, out_dirs={"--out-dir": ns.out_dir})
    arch = models.AlignArch.from_json(ns.arch) if ns.arch else None
    training.run_training(ns, read_pairs, functools.partial(load_model, arch=arch), make_task, resume_keys=RESUME_KEYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
