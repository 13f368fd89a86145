"""Recall models by name: what a script needs to score texts against images with any of
them, in one place.

    parser = argparse.ArgumentParser(); add_model_arguments(parser)   # --model + every model's options
    args = parser.parse_args(); check_model_arguments(parser, args)
    rm = build_recall_model(args.model, args, device)                  # a RecallModel
    emb, ok = rm.encode_images(paths, batch_size=32, device=device)    # N x D, normalised
    txt = rm.encode_texts(["西湖"], device=device)                      # 1 x D, normalised
    rm.identity()                                                      # "<name>:<sha256>" for cache keys

Registered:

* ``align`` — the paper's model (models/align.py), from ``--checkpoint`` and
  ``--bert-dir`` (``--arch`` for small variants); preprocessing utils/images.py
  (reference squash to 224, ImageNet mean/std); identity = hash of all its weights.
* ``taiyi`` — the Taiyi-CLIP baseline (models/taiyi.py), from ``--taiyi-text-dir``
  (``--taiyi-text-weights`` for the authors' fine-tuned text encoder) and
  ``--clip-dir``; preprocessing utils/clip_images.py; identity = hash of the image
  tower's weights (image vectors depend on nothing else, so the fine-tuned and the
  original text encoders share cached image vectors).

A third model: write its builder and add one ``ModelEntry`` to ``MODELS``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

import torch

from utils.hashing import model_hash


@dataclass
class RecallModel:
    """A loaded recall model with its tokenizer and image preprocessing."""
    name: str
    model: torch.nn.Module                 # encode_image(x, normalize), encode_text(ids, mask, normalize)
    tokenizer: object
    image_loader: Callable | None          # f(path, mode) -> (tensor, ok); None = utils.images.load_image
    max_text_len: int
    embed_dim: int
    hash_fn: Callable[[], str]             # weights hash that keys the image-vector cache
    sources: dict = field(default_factory=dict)   # which files it was built from (for run records)
    _hash: str | None = None

    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = self.hash_fn()
        return self._hash

    def identity(self) -> str:
        return f"{self.name}:{self.weights_hash()}"

    def encode_images(self, paths, batch_size=None, device="cpu", **kw):
        from utils.embed import encode_images
        return encode_images(self.model, paths, batch_size, device, image_loader=self.image_loader, **kw)

    def encode_texts(self, texts, batch_size: int = 64, device="cpu", **kw):
        from utils.embed import encode_texts
        return encode_texts(self.model, self.tokenizer, texts, batch_size, device,
                            max_length=self.max_text_len, **kw)


@dataclass
class ModelEntry:
    build: Callable[[argparse.Namespace, torch.device], RecallModel]
    options: list[tuple[str, dict]]        # argparse (flag, kwargs) of this model
    required: tuple[str, ...]              # flags that must be given with --model NAME
    help: str


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------
def _build_align(args, device) -> RecallModel:
    from utils.embed import MAX_TEXT_LEN
    from .align import load_tokenizer
    from .checkpoint import load_align_model
    model = load_align_model(args.checkpoint, args.bert_dir, arch=args.arch, device=device)
    return RecallModel("align", model, load_tokenizer(args.bert_dir), None, MAX_TEXT_LEN,
                       model.arch.embed_dim, lambda: model_hash(model),
                       {"checkpoint": args.checkpoint, "bert_dir": args.bert_dir, "arch": args.arch})


def _build_taiyi(args, device) -> RecallModel:
    from utils.images import load_clip_image
    from .taiyi import TAIYI_MAX_TEXT_LEN, load_taiyi, load_taiyi_tokenizer
    model = load_taiyi(args.taiyi_text_dir, args.clip_dir, args.taiyi_text_weights, device=device)
    return RecallModel("taiyi", model, load_taiyi_tokenizer(args.taiyi_text_dir), load_clip_image,
                       TAIYI_MAX_TEXT_LEN, model.embed_dim, lambda: model_hash(model.image_model),
                       {"taiyi_text_dir": args.taiyi_text_dir,
                        "taiyi_text_weights": args.taiyi_text_weights, "clip_dir": args.clip_dir})


MODELS: dict[str, ModelEntry] = {
    "align": ModelEntry(
        _build_align,
        [("--checkpoint", {"help": "align: recall weights (align_model.pth) or a ranker checkpoint"}),
         ("--bert-dir", {"help": "align: directory with bert-base-chinese config.json and vocab.txt"}),
         ("--arch", {"help": "align: architecture JSON for a non-default model (models.align.AlignArch)"})],
        ("--checkpoint", "--bert-dir"),
        "the paper's recall model (EfficientNet-B3 + 4-layer BERT)"),
    "taiyi": ModelEntry(
        _build_taiyi,
        [("--taiyi-text-dir", {"help": "taiyi: Hugging Face directory of IDEA-CCNL/Taiyi-CLIP-Roberta-102M-"
                                       "Chinese (config.json, vocab.txt; its weights unless "
                                       "--taiyi-text-weights is given)"}),
         ("--taiyi-text-weights", {"help": "taiyi: the authors' fine-tuned text encoder "
                                           "(pytorch_model.bin) replacing the directory's weights"}),
         ("--clip-dir", {"help": "taiyi: Hugging Face directory of openai/clip-vit-base-patch32 "
                                 "(config.json and model.safetensors or pytorch_model.bin)"})],
        ("--taiyi-text-dir", "--clip-dir"),
        "baseline: Taiyi-CLIP (Chinese RoBERTa text encoder + CLIP ViT-B/32 image tower)"),
}


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "align") -> None:
    """``--model`` and the options of every registered model (in their own group)."""
    g = parser.add_argument_group("model (--model NAME and its files)")
    g.add_argument("--model", choices=list(MODELS), default=default,
                   help="recall model: " + "; ".join(f"{k} = {e.help}" for k, e in MODELS.items())
                        + f" (default {default})")
    for entry in MODELS.values():
        for flag, kw in entry.options:
            g.add_argument(flag, **kw)


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit 2) naming the options the chosen model still needs."""
    missing = [f for f in MODELS[args.model].required
               if getattr(args, f.lstrip("-").replace("-", "_"), None) in (None, "")]
    if missing:
        parser.error(f"--model {args.model} needs {', '.join(missing)}")


def build_recall_model(name: str, args: argparse.Namespace, device="cpu") -> RecallModel:
    """Load model ``name`` from the paths in ``args``; raises CheckpointError,
    FileNotFoundError or ValueError with a message naming the file."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name].build(args, torch.device(device))
