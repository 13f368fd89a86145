#!/usr/bin/env python
"""Training of the siamese CTR ranker (stage 2) on $record$ image pairs.

    python rank_train.py --train-csv data/dwd_..._train_with_poi_tuomin.csv \\
        --val-csv data/dwd_..._val_with_poi_tuomin.csv --image-dir data/rank_images \\
        --poi-pic-num T --poi-image-vectors T --poi-name-vectors T \\
        --bert-dir data/bert-base-chinese --init data/align_model.pth --out-dir runs/rank1
    torchrun --nproc_per_node 2 rank_train.py ...same arguments...   # --batch-size is global

The recall model stays frozen in eval mode, as the authors trained it (Adam at 1e-3, batch
16, their augmentation). --out-dir: best.ckpt (best validation accuracy) and last.ckpt in
the released ranker format, train_state.pt (--resume), metrics.csv, config.json.
"""

from __future__ import annotations

from utils.cli import entry_point

import argparse
import functools
import logging
import sys
from pathlib import Path

import torch.nn.functional as F

import models
from utils import args, cli, training
from utils.formats import load_poi_tables

log = logging.getLogger("rank_train")

# the settings a --resume must not change besides the training ones
RESUME_KEYS = ("train_csv", "optimizer", "loss", "margin", "augment")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rank_train.py", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("data")
    g.add_argument("--train-csv", required=True, help="$record$ training pairs (label: ctr_a > ctr_b)")
    g.add_argument("--val-csv", required=True, help="$record$ validation pairs")
    g.add_argument("--image-dir", required=True, help="folder of <item_id>_a/_b image files")
    g.add_argument("--val-image-dir", help="folder of the validation images (default --image-dir)")
    text = "no RandomRotation(5) + RandomHorizontalFlip(0.3)"
    g.add_argument("--no-augment", dest="augment", action="store_false", help=text)
    g.add_argument("--cache-embeddings", action="store_true", help="encode each training image once (--no-augment)")
    args.add_bad_rows(g)
    args.add_poi_tables(p, aliases=True)
    g = args.add_recall_files(p, "model", checkpoint=None)
    g.add_argument("--init", help="recall checkpoint (new ranker head) or ranker checkpoint (to continue)")
    args.add_training(p, batch_size=16, weight_decay=0.0, warmup_steps=0, schedule="constant", clip_grad=0.0)
    g = p.add_argument_group("ranker training")
    g.add_argument("--epochs", type=cli.positive_int, default=10, help="(default 10)")
    g.add_argument("--lr", type=cli.non_negative_float, default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default="adam", help="(default adam)")
    g.add_argument("--loss", choices=("bce", "margin"), default="bce", help="default bce: BCE on sigmoid(s_a - s_b)")
    g.add_argument("--margin", type=cli.finite_float, default=0.5, help="margin of --loss margin (default 0.5)")
    args.add_run(p)
    return p


def read_pairs(ns) -> tuple[list, list, dict]:
    train_pairs, bad = training.read_rank_pairs(ns.train_csv, ns.image_dir, ns.skip_bad_rows)
    val_pairs, bad_val = training.read_rank_pairs(ns.val_csv, ns.val_image_dir or ns.image_dir, ns.skip_bad_rows)
    return train_pairs, val_pairs, {ns.train_csv: bad, ns.val_csv: bad_val}


def load_model(ns, device, resume_from: Path | None, arch: models.AlignArch | None) -> models.SiameseRanker:
    """The last checkpoint (on resume), --init's ranker, a new head on --init's recall model, or random."""
    if resume_from is not None:
        ranker = models.load_ranker(resume_from, ns.bert_dir)
    elif not ns.init:
        log.warning("no --init: the frozen recall model is RANDOM (speed tests only)")
        ranker = models.SiameseRanker(models.AlignModel.from_bert_dir(ns.bert_dir, arch or models.AlignArch()))
    elif any(k.startswith("align_model.") for k in models.read_checkpoint(ns.init)[0]):
        log.info("initialised from ranker checkpoint %s (head and recall model)", ns.init)
        ranker = models.load_ranker(ns.init, ns.bert_dir, arch=arch)
    else:
        log.info("recall model from %s; new ranker head", ns.init)
        ranker = models.SiameseRanker(models.load_align_model(ns.init, ns.bert_dir, arch=arch))
    return ranker.to(device)


def pair_loss(s_a, s_b, label, kind: str, margin: float):
    if kind == "bce":  # BCE(sigmoid(s_a - s_b), label), computed stably
        return F.binary_cross_entropy_with_logits(s_a - s_b, label)
    return F.margin_ranking_loss(s_a, s_b, label * 2 - 1, margin=margin)


def make_task(ns, env, enc, train_pairs, val_pairs, ranker: models.SiameseRanker) -> training.Task:
    files = (ns.poi_pic_num, ns.poi_image_vectors, ns.poi_name_vectors)
    tables = load_poi_tables(*files, dim=ranker.align_model.arch.embed_dim, trust_pickle=ns.trust_pickle)
    if not (tables.image_vectors and tables.name_vectors):
        log.warning("no POI image/name vector table given: POI vectors are zero")
    tokenizer = models.load_tokenizer(ns.bert_dir)
    rm = models.wrap_align(ranker.align_model, tokenizer, device=env.device, backend=ns.backend)
    texts, val_images, train_images = training.encode_once(rm, train_pairs, val_pairs, enc, env, ns.cache_embeddings)
    images = "cached" if ns.cache_embeddings else "encoded each step"
    log.info("loss %s; augmentation %s; training images %s", ns.loss, "on" if ns.augment else "off", images)

    def loss(module, batch):
        s_a, s_b = module(*batch[:-1])
        return pair_loss(s_a.float(), s_b.float(), batch[-1], ns.loss, ns.margin)

    return training.Task(
        module=training.PairScorer(ranker, texts.table, train_images.table if train_images else None),
        dataset=training.RankPairDataset(train_pairs, tables, texts, ns.preprocess, ns.augment, ns.seed, train_images),
        loss=loss,
        save=models.save_ranker_checkpoint,
        validate=lambda: training.validate_pairs(ranker, val_pairs, tables, texts, val_images, ns.eval_batch_size),
        select="accuracy",
        val_fields=("accuracy", "auc", "log_loss", "baseline", "n"),
    )


@entry_point
def main(argv=None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.augment and ns.cache_embeddings:
        p.error("--cache-embeddings needs --no-augment: augmented images differ every epoch, so cannot be cached")
    # inputs readable, --out-dir writable and the --arch architecture read, before any work
    tables = {"--poi-pic-num": ns.poi_pic_num, "--poi-image-vectors": ns.poi_image_vectors}
    files = {"--init": ns.init, **tables, "--poi-name-vectors": ns.poi_name_vectors}
    dirs = {"--image-dir": ns.image_dir, "--val-image-dir": ns.val_image_dir, "--bert-dir": ns.bert_dir}
    cli.check_files(files, dirs, out_dirs={"--out-dir": ns.out_dir})
    arch = models.AlignArch.from_json(ns.arch) if ns.arch else None
    config = {"last_file": "last.ckpt", "best_file": "best.ckpt", "resume_keys": RESUME_KEYS}
    training.run_training(ns, read_pairs, functools.partial(load_model, arch=arch), make_task, **config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
