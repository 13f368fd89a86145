"""Stage 1, the alignment model (SPEC 2): EfficientNet (B3) to ``embed_dim`` then ``image_hidden_layer``;
BERT's [CLS] through ``text_hidden_layer``; L2-normalised vectors whose dot product is multiplied (not
exponentiated) by ``logit_scale``. Attribute names are the released checkpoint's key prefixes."""

from __future__ import annotations

from utils.cli import DataError

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.model import VALID_MODELS

from utils.io import read_json

from .bert import BertConfig, BertEncoder, BertTokenizer, load_text_config, model_file

# Bounds checked before anything is built: a wrong number would otherwise ask for terabytes.
MAX_EMBED_DIM, MAX_TEXT_LAYERS = 1 << 14, 64
# efficientnet_pytorch parameters a small variant may change: (lowest, highest)
IMAGE_OVERRIDES = {
    "width_coefficient": (0.01, 4),
    "depth_coefficient": (0.01, 4),
    "depth_divisor": (1, 64),
    "min_depth": (1, 1024),
    "dropout_rate": (0, 0.99),
    "drop_connect_rate": (0, 0.99),
    "batch_norm_momentum": (0, 1),
    "batch_norm_epsilon": (0, 1),
    "image_size": (1, 4096),
}
BERT_DIR_HINT = "--bert-dir must hold bert-base-chinese's config.json and vocab.txt (download_assets.py fetches them)"


@dataclass
class AlignArch:
    """Architecture of an alignment model (defaults: the released one); ``image_overrides``: efficientnet_pytorch's."""

    image_model: str = "efficientnet-b3"
    image_overrides: dict = field(default_factory=dict)
    text_layers: int = 4
    embed_dim: int = 512

    @classmethod
    def from_dict(cls, d: dict | None) -> AlignArch:
        """A ValueError for anything but a dict of known fields, of the right types, in bounds."""
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of architecture fields, found {type(d).__name__}")
        if unknown := set(d) - set(cls.__dataclass_fields__):
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        for name, want in (("image_model", str), ("image_overrides", dict), ("text_layers", int), ("embed_dim", int)):
            if name in d and (not isinstance(d[name], want) or isinstance(d[name], bool)):
                raise ValueError(f"architecture field {name!r} must be a {want.__name__}, found {d[name]!r}")
        arch = cls(**d)
        if arch.image_model not in VALID_MODELS:
            raise ValueError(f"architecture field 'image_model' must be one of {', '.join(VALID_MODELS)}")
        for name, top in (("text_layers", MAX_TEXT_LAYERS), ("embed_dim", MAX_EMBED_DIM)):
            if not 1 <= getattr(arch, name) <= top:
                raise ValueError(f"architecture field {name!r} must be 1 to {top}, found {getattr(arch, name)}")
        for k, v in arch.image_overrides.items():
            low, high = IMAGE_OVERRIDES.get(k, (1, 0))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ValueError(f"image override {k}={v!r}: expected one of {', '.join(IMAGE_OVERRIDES)}, in bounds")
        return arch

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AlignArch:
        """The architecture in a JSON file (a ``DataError`` naming it when unusable)."""
        try:
            return cls.from_dict(read_json(path))
        except ValueError as e:
            raise DataError(f"{path}: not a valid architecture: {e}") from None

    @property
    def is_default(self) -> bool:
        return self == AlignArch()


def load_tokenizer(bert_dir: str | os.PathLike) -> BertTokenizer:
    """Tokenizer from ``bert_dir/vocab.txt`` only (lower-casing on, as the authors had it)."""
    return BertTokenizer(model_file(bert_dir, "vocab.txt", BERT_DIR_HINT))


class AlignModel(nn.Module):
    def __init__(self, text_config: BertConfig, arch: AlignArch | None = None):
        super().__init__()
        self.arch = arch or AlignArch()
        self.embed_dim = d = self.arch.embed_dim
        self.image_model = EfficientNet.from_name(self.arch.image_model, num_classes=d, **self.arch.image_overrides)
        # the memory-efficient swish is a training-memory trick; the plain one computes the same, faster
        self.image_model.set_swish(memory_efficient=False)
        self.text_model = BertEncoder(text_config)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.image_hidden_layer = nn.Linear(d, d)
        self.text_hidden_layer = nn.Linear(text_config.hidden_size, d)

    @classmethod
    def from_bert_dir(cls, bert_dir, arch: AlignArch | None = None) -> AlignModel:
        arch = arch or AlignArch()
        config = load_text_config(bert_dir, BERT_DIR_HINT)
        config.num_hidden_layers = arch.text_layers
        return cls(config, arch)

    def encode_image(self, images, normalize: bool = True) -> torch.Tensor:
        x = self.image_hidden_layer(self.image_model(images))
        return F.normalize(x, p=2, dim=1) if normalize else x

    def encode_text(self, input_ids, attention_mask, normalize: bool = True) -> torch.Tensor:
        x = self.text_hidden_layer(self.text_model(input_ids, attention_mask)[:, 0])
        return F.normalize(x, p=2, dim=1) if normalize else x

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return image_emb @ text_emb.t() * self.logit_scale


def contrastive_loss(sims: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over a square similarity matrix with the pairs on the diagonal."""
    labels = torch.arange(sims.shape[0], device=sims.device)
    return (F.cross_entropy(sims, labels) + F.cross_entropy(sims.t(), labels)) / 2
