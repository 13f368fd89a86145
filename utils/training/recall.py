"""What contrastive training of the alignment model (``models.AlignModel``) is made of,
besides the loop: the dataset of (image, text) pairs, the module DDP wraps (a frozen
tower, BatchNorm on its running statistics, cached image vectors) and held-out recall@K."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from utils.evaluation import recall_at_k
from utils.formats import load_image

from .data import Pair


class TextImageDataset(Dataset):
    """Item i: (image tensor, or ``i`` when the image vectors are cached; ``i``). ``collate``
    makes a batch (images, input_ids, attention_mask) with ``tokenize(texts)``, in the
    DataLoader's workers."""

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


def set_trainable(align: nn.Module, freeze: str) -> None:
    """Every weight trains but the text pooler (in the checkpoint, not in the output) and,
    with ``freeze`` "image" or "text", that tower and its projection."""
    frozen = {
        "image": (align.image_model, align.image_hidden_layer),
        "text": (align.text_model, align.text_hidden_layer),
    }.get(freeze, ())
    align.requires_grad_(True)
    for m in (align.text_model.pooler, *frozen):
        m.requires_grad_(False)


class PairEncoder(nn.Module):
    """The module DDP wraps: the (image, text) embeddings of a batch. A frozen tower stays
    in eval mode; ``bn_eval`` keeps the image tower's BatchNorm on its running statistics
    (then several processes equal one); with ``image_table`` (cached image vectors) a
    batch's images are their row numbers."""

    def __init__(self, align: nn.Module, freeze: str = "none", bn_eval: bool = False, image_table=None):
        super().__init__()
        self.align, self.freeze, self.bn_eval = align, freeze, bn_eval
        self.image_table = image_table  # not a parameter or buffer: never in a checkpoint

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            return self
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
        if self.image_table is not None:
            img = self.image_table[images]
        else:
            with torch.set_grad_enabled(self.freeze != "image" and torch.is_grad_enabled()):
                img = self.align.encode_image(images)
        with torch.set_grad_enabled(self.freeze != "text" and torch.is_grad_enabled()):
            txt = self.align.encode_text(input_ids, attention_mask)
        return img, txt


def held_out_recall(rm, val: list[Pair], ks: list[int], enc, image_vecs=None) -> dict:
    """Text -> image recall@K through ``rm`` (a ``RecallModel``) with ``enc`` (an
    ``Encoding``): every held-out (owner, text) query against every held-out image; a hit
    is an image of the query's owner in the top K."""
    queries = list(dict.fromkeys((p.owner, p.text) for p in val))
    if image_vecs is None:
        image_vecs, _ = rm.encode_images([p.image for p in val], enc, desc="held-out")
    texts = rm.encode_texts([t for _, t in queries], enc)
    rec = recall_at_k(texts @ image_vecs.T, [o for o, _ in queries], [p.owner for p in val], ks)
    return {f"recall@{k}": v for k, v in rec.items()} | {"queries": len(queries), "gallery": len(val)}
