"""Contrastive training of the alignment model besides the loop: pairs, dataset, module, recall@K."""

from __future__ import annotations

from utils.cli import DataError, RowError, bad_rows, input_file, record_bad_row

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from utils.evaluation import recall_at_k
from utils.formats import csv_records, index_images, iter_recall_csv, load_image

from .dist import DistEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    text: str
    image: str
    owner: str


def _plain_pairs(path: str, header: list[str], rows, image_dir, errors):
    base = Path(image_dir) if image_dir else Path(path).resolve().parent
    for line, fields in rows:
        cells = dict(zip(header, fields))  # as csv.DictReader: missing cells are empty
        text, image, owner = (cells.get(k, "") for k in ("text", "image", "owner"))
        if text and image:
            image_path = base / image  # an absolute path stays as it is
            yield line, Pair(text, str(image_path), owner or text) if image_path.is_file() else str(image_path)
        elif text or image:
            record_bad_row(errors, RowError(path, line, "empty text or image"))


def _recall_format_pairs(path: str, image_dir, errors):
    if not image_dir:
        raise DataError(f"{path}: a recall-format CSV needs --image-dir (the <poi_id>_<rank>.<ext> files)")
    images = index_images(image_dir)
    for row in iter_recall_csv(path, errors):
        image = images.get(row.key)
        if not row.poi_name.strip():
            record_bad_row(errors, RowError(path, row.line, "empty poi_name"))
        else:
            yield row.line, Pair(row.poi_name.strip(), str(image), row.poi_id) if image else f"{row.key}.*"


def with_images(path: str, found, errors: list, skip_bad_rows: bool, image_dir) -> tuple[list, int]:
    """``(items, bad rows)`` of ``found``'s ``(line, item)``; an item that is a str (an absent image) is logged."""
    found = list(found)  # fills ``errors``
    items = [item for _, item in found if not isinstance(item, str)]
    missing = [f"{path}:{line}: {item}" for line, item in found if isinstance(item, str)]
    n_bad = bad_rows(errors, path, skip_bad_rows)
    if not items and not missing:
        raise DataError(f"{path}: no records left" if n_bad else f"{path}: empty file")
    if missing:
        log.warning("%s: %d pairs left out, image file absent (first: %s)", path, len(missing), "; ".join(missing[:3]))
    if not items:
        raise DataError(f"{path}: no row has its image files (image dir: {image_dir})")
    return items, n_bad


def read_text_pairs(path, image_dir=None, skip_bad_rows: bool = False) -> tuple[list[Pair], int]:
    """The pairs of a recall-format CSV (owner: the poi_id) or one with a ``text,image[,owner]``
    header (owner: the text; images under ``image_dir`` or the CSV's), and the bad rows left out."""
    path, errors = str(input_file(path)), []
    rows = ((line, [x.strip() for x in fields]) for line, fields in csv_records(path, errors))
    header = [x.lower() for x in next(rows, (0, []))[1]]
    if not header:  # nothing but blank lines, or lines that are not UTF-8
        raise DataError(str(errors[0]) if errors else f"{path}: empty file")
    if "text" in header and "image" in header:
        found = _plain_pairs(path, header, rows, image_dir, errors)
    else:
        rows.close()
        errors.clear()  # the recall-format reader reports them
        found = _recall_format_pairs(path, image_dir, errors)
    return with_images(path, found, errors, skip_bad_rows, image_dir)


def split_owners(pairs: list[Pair], val_fraction: float, val_owners: int | None, seed: int):
    """(training, held-out) pairs: a seeded random share of the owners is held out whole."""
    owners = sorted({p.owner for p in pairs})
    n_val = val_owners if val_owners is not None else int(round(val_fraction * len(owners)))
    if not 0 <= n_val < len(owners):
        raise DataError(f"cannot hold out {n_val} of the {len(owners)} owners (--val-owners / --val-fraction)")
    held = {owners[i] for i in np.random.default_rng(seed).permutation(len(owners))[:n_val]}
    return [p for p in pairs if p.owner not in held], [p for p in pairs if p.owner in held]


class TextImageDataset(Dataset):
    """Item i: (image tensor or, cached, ``i``; ``i``); ``collate`` tokenizes in the workers."""

    def __init__(self, pairs: list[Pair], mode: str, cached: bool, tokenize):
        self.pairs, self.mode, self.cached, self.tokenize = pairs, mode, cached, tokenize

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return (torch.tensor(i) if self.cached else load_image(self.pairs[i].image, self.mode)[0]), i

    def collate(self, batch):
        xs, idx = zip(*batch)
        enc = self.tokenize([self.pairs[i].text for i in idx])
        return torch.stack(xs), enc["input_ids"], enc["attention_mask"]


class PairEncoder(nn.Module):
    """The module DDP wraps: (image, text) embeddings; all trains but the text pooler and a ``freeze`` tower;
    ``bn_eval``: image BatchNorm on running statistics."""

    def __init__(self, align: nn.Module, freeze: str = "none", bn_eval: bool = False, image_table=None):
        super().__init__()
        self.align, self.freeze, self.bn_eval = align, freeze, bn_eval
        self.image_table = image_table  # not a parameter or buffer: never in a checkpoint
        frozen = {
            "image": (align.image_model, align.image_hidden_layer),
            "text": (align.text_model, align.text_hidden_layer),
        }.get(freeze, ())
        align.requires_grad_(True)
        for m in (align.text_model.pooler, *frozen):
            m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        tower = {"image": self.align.image_model, "text": self.align.text_model}.get(self.freeze)
        if mode and tower is not None:
            tower.eval()
        if mode and self.bn_eval:
            for m in self.align.image_model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images, input_ids, attention_mask):
        img = self.image_table[images] if self.image_table is not None else self.align.encode_image(images)
        return img, self.align.encode_text(input_ids, attention_mask)


def held_out_recall(rm, val: list[Pair], ks: list[int], enc, image_vecs=None) -> dict:
    """Recall@K of each held-out (owner, text) query against the held-out images."""
    queries = list(dict.fromkeys((p.owner, p.text) for p in val))
    if image_vecs is None:
        image_vecs, _ = rm.encode_images([p.image for p in val], enc, desc="held-out")
    texts = rm.encode_texts([t for _, t in queries], enc)
    rec = recall_at_k(texts @ image_vecs.T, [o for o, _ in queries], [p.owner for p in val], ks)
    return {f"recall@{k}": v for k, v in rec.items()} | {"queries": len(queries), "gallery": len(val)}


def encode_images_once(rm, paths: list[str], enc, env: DistEnv):
    """``paths`` through the frozen image tower; under torchrun rank 0 sets the engine up first."""
    if env.distributed and env.is_main:
        rm.image_encoder()
    env.barrier()
    vecs, ok = rm.encode_images(paths, enc, desc="frozen image tower")
    if not ok.all():
        log.warning("%d images unreadable (zero image used, as the authors did)", int((~ok).sum()))
    return vecs
