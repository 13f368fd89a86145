"""Stage 1: the text-image alignment model ("ALIGN", SPEC section 2).

Image tower: EfficientNet (efficientnet_pytorch, B3 by default) whose ``_fc`` maps to
``embed_dim``, then ``image_hidden_layer``; text tower: a BERT encoder whose [CLS]
state goes through ``text_hidden_layer``. Both vectors are L2-normalised and compared
by a dot product multiplied (not exponentiated) by ``logit_scale``.

The attribute names (``image_model``, ``text_model``, ``image_hidden_layer``,
``text_hidden_layer``, ``logit_scale``) are the state-dict prefixes of the released
checkpoint; do not rename them.
"""

from __future__ import annotations

from utils.cli import DataError, UserError

import contextlib
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet

from utils.io import read_json

from .bert import BertConfig, BertEncoder, BertTokenizer


class ModelFilesError(UserError, FileNotFoundError):
    """A file a model needs (config, vocabulary) is missing."""


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


@contextlib.contextmanager
def skip_init():
    """Build modules without their random initialisation, for a model whose every weight
    is loaded next (the strict loader checks that): construction then costs next to
    nothing. torch's init functions (which every layer's ``reset_parameters`` and
    :class:`models.bert.BertEncoder`'s initialisation call) return their tensor
    untouched inside the block."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


@dataclass
class AlignArch:
    """Architecture of an alignment model. The defaults are the released model.

    ``image_overrides`` are efficientnet_pytorch global-parameter overrides (for
    example ``width_coefficient``) used only by small test and training variants;
    ``text_layers`` overrides ``num_hidden_layers`` of the BERT config read from the
    bert directory.
    """

    image_model: str = "efficientnet-b3"
    image_overrides: dict = field(default_factory=dict)
    text_layers: int = 4
    embed_dim: int = 512

    @classmethod
    def from_dict(cls, d: dict | None) -> AlignArch:
        """Raises ValueError for anything but a dict of known fields of the right types."""
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of architecture fields, found {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        types = {"image_model": str, "image_overrides": dict, "text_layers": int, "embed_dim": int}
        for f in fields(cls):
            if f.name in d and (not isinstance(d[f.name], types[f.name]) or isinstance(d[f.name], bool)):
                raise ValueError(
                    f"architecture field {f.name!r} must be a {types[f.name].__name__}, found {d[f.name]!r}"
                )
        for name in ("text_layers", "embed_dim"):
            if name in d and d[name] < 1:
                raise ValueError(f"architecture field {name!r} must be >= 1, found {d[name]}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AlignArch:
        """The architecture in a JSON file; a ``DataError`` naming the file (and the line
        of a JSON syntax error) when it cannot be used."""
        d = read_json(path)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise DataError(f"{path}: not a valid architecture: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_default(self) -> bool:
        return self == AlignArch()


def _need(bert_dir: str | os.PathLike, name: str) -> str:
    path = os.path.join(bert_dir, name)
    if not os.path.isfile(path):
        raise ModelFilesError(
            f"{path}: missing; --bert-dir must hold bert-base-chinese's "
            f"config.json and vocab.txt (download_assets.py fetches them)"
        )
    return path


def load_text_config(bert_dir: str | os.PathLike, num_layers: int) -> BertConfig:
    """BERT config from ``bert_dir/config.json`` with the layer count overridden."""
    config = BertConfig.from_json_file(_need(bert_dir, "config.json"))
    config.num_hidden_layers = num_layers
    return config


def load_tokenizer(bert_dir: str | os.PathLike) -> BertTokenizer:
    """Tokenizer from ``bert_dir/vocab.txt`` only (lower-casing on, as the authors'
    ``BertTokenizer.from_pretrained(".../vocab.txt")`` had it); nothing from a hub."""
    return BertTokenizer(_need(bert_dir, "vocab.txt"))


class AlignModel(nn.Module):
    def __init__(self, text_config: BertConfig, arch: AlignArch | None = None):
        super().__init__()
        self.arch = arch or AlignArch()
        d = self.arch.embed_dim
        self.image_model = EfficientNet.from_name(self.arch.image_model, num_classes=d, **self.arch.image_overrides)
        # The memory-efficient swish is a training-memory trick with a custom autograd
        # function; the plain one computes the same values and runs faster.
        self.image_model.set_swish(memory_efficient=False)
        self.text_model = BertEncoder(text_config)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.image_hidden_layer = nn.Linear(d, d)
        self.text_hidden_layer = nn.Linear(text_config.hidden_size, d)

    @classmethod
    def from_bert_dir(cls, bert_dir, arch: AlignArch | None = None) -> AlignModel:
        arch = arch or AlignArch()
        return cls(load_text_config(bert_dir, arch.text_layers), arch)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_hidden_layer(self.image_model(images))
        return F.normalize(x, p=2, dim=1) if normalize else x

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        x = self.text_hidden_layer(self.text_model(input_ids, attention_mask)[:, 0])
        return F.normalize(x, p=2, dim=1) if normalize else x

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return image_emb @ text_emb.t() * self.logit_scale

    def forward(self, images, input_ids, attention_mask) -> torch.Tensor:
        """Contrastive loss of a batch of matching (image, text) pairs."""
        return contrastive_loss(self.similarity(self.encode_image(images), self.encode_text(input_ids, attention_mask)))


def contrastive_loss(sims: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over a square similarity matrix whose matching pairs
    sit on the diagonal: ``(CE(sims, arange) + CE(sims.T, arange)) / 2``."""
    labels = torch.arange(sims.shape[0], device=sims.device)
    return (F.cross_entropy(sims, labels) + F.cross_entropy(sims.t(), labels)) / 2
