"""Training of the siamese ranker besides the loop: pairs, frozen vectors, dataset, module, validation."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset

from utils.evaluation import pairwise_metrics
from utils.formats import PoiTables, RankRow, index_images, iter_rank_csv, load_image, pois_text, stack_inputs

from .dist import DistEnv
from .recall import encode_images_once, with_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankPair:
    row: RankRow
    image_a: str
    image_b: str


def read_rank_pairs(path, image_dir, skip_bad_rows: bool = False) -> tuple[list[RankPair], int]:
    """The records whose images ``<item_id>_a/_b.*`` are in ``image_dir``; the bad rows left out."""
    path, errors, found = str(path), [], []
    images = index_images(image_dir)
    for row in iter_rank_csv(path, errors):
        a, b = images.get(row.key_a), images.get(row.key_b)
        if a is None or b is None:
            found.append((row.line, f"{row.key_a if a is None else row.key_b}.*"))
        else:
            found.append((row.line, RankPair(row, str(a), str(b))))
    return with_images(path, found, errors, skip_bad_rows, image_dir)


class Vectors:
    """A table of vectors (on the device) and the row of each key (a text or a path)."""

    def __init__(self, table: torch.Tensor, keys: list[str]):
        self.table, self.rows = table, {k: i for i, k in enumerate(keys)}


def encode_once(rm, train: list[RankPair], val: list[RankPair], enc, env: DistEnv, cache_train: bool):
    """``Vectors`` of the distinct ``pois_feature`` texts, the validation and training images."""
    texts = list(dict.fromkeys(pois_text(p.row.title, p.row.poi_names) for p in train + val))
    text_table = rm.encode_texts(texts, replace(enc, progress=False)).to(env.device)
    log.info("%d train pairs, %d val pairs, %d distinct pois_feature texts", len(train), len(val), len(texts))
    val_paths = list(dict.fromkeys(x for p in val for x in (p.image_a, p.image_b)))
    train_paths = list(dict.fromkeys(x for p in train for x in (p.image_a, p.image_b))) if cache_train else []
    vecs = encode_images_once(rm, val_paths + train_paths, enc, env).to(env.device)
    trained = Vectors(vecs[len(val_paths) :], train_paths) if cache_train else None
    return Vectors(text_table, texts), Vectors(vecs[: len(val_paths)], val_paths), trained


def augment_pil(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The authors' ``RandomRotation(5)`` (nearest neighbour, black fill), ``RandomHorizontalFlip(0.3)``."""
    angle = float(rng.uniform(-5.0, 5.0))
    img = img.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=0)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.3 else img


class RankPairDataset(Dataset):
    """Item i: images a and b (or cached vector rows), POI inputs, ``pois_feature`` row, label."""

    def __init__(self, pairs, tables: PoiTables, texts: Vectors, mode: str, augment: bool, seed: int, images=None):
        self.pairs, self.tables, self.mode, self.augment, self.seed = pairs, tables, mode, augment, seed
        self.text_rows = [texts.rows[pois_text(p.row.title, p.row.poi_names)] for p in pairs]
        self.image_rows = images.rows if images is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, path: str, i: int, side: int):
        if self.image_rows is not None:
            return torch.tensor(self.image_rows[path])
        rng = np.random.default_rng([self.seed, self.epoch, i, side])  # resumable augmentation
        return load_image(path, self.mode, functools.partial(augment_pil, rng=rng) if self.augment else None)[0]

    def __getitem__(self, i: int):
        p = self.pairs[i]
        item = self.tables.inputs(p.row.title, p.row.poi_names)
        a, b = self._image(p.image_a, i, 0), self._image(p.image_b, i, 1)
        poi = torch.from_numpy(item.poi_img), torch.from_numpy(item.poi_txt), torch.tensor(item.poi_len)
        return a, b, *poi, torch.tensor(self.text_rows[i]), torch.tensor(float(p.row.label))


class PairScorer(nn.Module):
    """The module DDP wraps: (s_a, s_b) of a batch; the recall model stays frozen in eval mode."""

    def __init__(self, ranker: nn.Module, text_table: torch.Tensor, image_table=None):
        super().__init__()
        self.ranker, self.text_table, self.image_table = ranker, text_table, image_table
        ranker.align_model.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ranker.align_model.eval()
        return self

    def forward(self, a, b, poi_img, poi_txt, poi_len, text_idx):
        ab = torch.cat([a, b])
        e = self.image_table[ab] if self.image_table is not None else self.ranker.align_model.encode_image(ab)
        ea, eb = e.split(len(a))
        feat = self.text_table[text_idx]
        s_a = self.ranker.score_embeddings(ea, feat, poi_img, poi_txt, poi_len)
        s_b = self.ranker.score_embeddings(eb, feat, poi_img, poi_txt, poi_len)
        return s_a.squeeze(1), s_b.squeeze(1)


def validate_pairs(
    ranker: nn.Module, pairs: list[RankPair], tables: PoiTables, texts: Vectors, images: Vectors, batch_size: int
) -> dict:
    """Pairwise accuracy (the published metric), ROC-AUC, log loss, constant-guess baseline."""
    items = [tables.inputs(p.row.title, p.row.poi_names) for p in pairs]
    poi = [torch.from_numpy(x) for x in stack_inputs(items, tables.dim)]
    feat = texts.table[[texts.rows[it.pois_text] for it in items]]
    vec_a = images.table[[images.rows[p.image_a] for p in pairs]]
    vec_b = images.table[[images.rows[p.image_b] for p in pairs]]
    s_a = ranker.score_many(vec_a, feat, *poi, batch_size=batch_size)
    s_b = ranker.score_many(vec_b, feat, *poi, batch_size=batch_size)
    return pairwise_metrics([p.row.label for p in pairs], s_a.numpy(), s_b.numpy())
