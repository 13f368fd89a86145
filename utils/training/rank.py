"""What training of the siamese ranker (``models.SiameseRanker``) is made of, besides the
loop: the frozen recall tower's vectors computed once (every distinct ``pois_feature``
text; the images that are never augmented), the authors' augmentation, the dataset of
image pairs with their POI inputs, the module DDP wraps and the pairwise validation."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils.evaluation import pairwise_metrics
from utils.formats import PoiTables, load_image, pois_text

from .data import RankPair, encode_images_once
from .dist import DistEnv

log = logging.getLogger(__name__)


class Vectors:
    """A table of vectors (on the device) and the row of each key (a text or a path)."""

    def __init__(self, table: torch.Tensor, keys: list[str]):
        self.table, self.rows = table, {k: i for i, k in enumerate(keys)}


def encode_once(rm, train: list[RankPair], val: list[RankPair], enc, env: DistEnv, cache_train: bool):
    """``Vectors`` of the texts, the validation images and the training images (or None):
    the ``pois_feature`` vector of every distinct POI string (or title), the images
    through the frozen tower of ``rm`` (a ``RecallModel``) with ``enc`` (an ``Encoding``)."""
    texts = list(dict.fromkeys(pois_text(p.row.title, p.row.poi_names) for p in train + val))
    text_table = rm.encode_texts(texts, replace(enc, progress=False)).to(env.device)
    log.info("%d train pairs, %d val pairs, %d distinct pois_feature texts", len(train), len(val), len(texts))
    val_paths = list(dict.fromkeys(x for p in val for x in (p.image_a, p.image_b)))
    train_paths = list(dict.fromkeys(x for p in train for x in (p.image_a, p.image_b))) if cache_train else []
    vecs = encode_images_once(rm, val_paths + train_paths, enc, env).to(env.device)
    trained = Vectors(vecs[len(val_paths) :], train_paths) if cache_train else None
    return Vectors(text_table, texts), Vectors(vecs[: len(val_paths)], val_paths), trained


def augment_pil(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The authors' ``RandomRotation(5)`` (uniform angle, about the centre, nearest
    neighbour, same size, black fill) then ``RandomHorizontalFlip(0.3)``."""
    angle = float(rng.uniform(-5.0, 5.0))
    fill = (0,) * len(img.getbands()) if len(img.getbands()) > 1 else 0
    img = img.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=fill)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.3 else img


class RankPairDataset(Dataset):
    """Item i: image a, image b (tensors, or rows of cached vectors), the item's POI
    inputs, the row of its ``pois_feature`` vector and the label. Augmentation draws from
    (seed, epoch, i, side) only, so runs repeat and resume exactly."""

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
        rng = np.random.default_rng([self.seed, self.epoch, i, side])
        return load_image(path, self.mode, functools.partial(augment_pil, rng=rng) if self.augment else None)[0]

    def __getitem__(self, i: int):
        p = self.pairs[i]
        item = self.tables.inputs(p.row.title, p.row.poi_names)
        return (
            self._image(p.image_a, i, 0),
            self._image(p.image_b, i, 1),
            torch.from_numpy(item.poi_img),
            torch.from_numpy(item.poi_txt),
            torch.tensor(item.poi_len),
            torch.tensor(self.text_rows[i]),
            torch.tensor(float(p.row.label)),
        )


class PairScorer(nn.Module):
    """The module DDP wraps: (s_a, s_b) of a batch of pairs. The recall model stays frozen
    in eval mode; ``image_table`` holds cached image vectors, ``text_table`` the
    ``pois_feature`` vectors."""

    def __init__(self, ranker: nn.Module, text_table: torch.Tensor, image_table=None):
        super().__init__()
        self.ranker, self.text_table, self.image_table = ranker, text_table, image_table

    def train(self, mode: bool = True):
        super().train(mode)
        self.ranker.align_model.eval()
        return self

    def forward(self, a, b, poi_img, poi_txt, poi_len, text_idx):
        if self.image_table is not None:
            ea, eb = self.image_table[a], self.image_table[b]
        else:
            with torch.no_grad():
                e = self.ranker.align_model.encode_image(torch.cat([a, b]))
            ea, eb = e[: len(a)], e[len(a) :]
        feat = self.text_table[text_idx]
        s_a = self.ranker.score_embeddings(ea, feat, poi_img, poi_txt, poi_len)
        s_b = self.ranker.score_embeddings(eb, feat, poi_img, poi_txt, poi_len)
        return s_a.squeeze(1), s_b.squeeze(1)


@torch.no_grad()
def validate_pairs(scorer: PairScorer, dataset: RankPairDataset, batch_size: int, device) -> dict:
    """Pairwise accuracy (the published metric), ROC-AUC, log loss, constant-guess baseline."""
    was = scorer.training
    scorer.eval()
    sa, sb = [], []
    loader = DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())  # keeps the global RNG
    for batch in loader:
        s_a, s_b = scorer(*(t.to(device) for t in batch[:-1]))
        sa.append(s_a.float().cpu())
        sb.append(s_b.float().cpu())
    scorer.train(was)
    labels = [p.row.label for p in dataset.pairs]
    return pairwise_metrics(labels, torch.cat(sa).numpy(), torch.cat(sb).numpy())
