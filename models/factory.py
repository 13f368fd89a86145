"""The one way to build a recall model by name (``MODELS``: ``align``, the paper's; ``taiyi``, the
baseline), wrapped in a ``RecallModel``. A third model: a builder and one ``ModelEntry``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from utils.formats import load_clip_image
from utils.hashing import model_hash

from .align import load_tokenizer
from .checkpoint import load_align_model
from .engine import RecallModel


@dataclass
class ModelEntry:
    build: Callable[..., RecallModel]  # build(engine settings, **paths) -> RecallModel
    options: dict[str, str]  # path option name -> help (scripts make flags of them)
    required: tuple[str, ...]  # options that must be given
    help: str


def _build_align(engine: dict, checkpoint, bert_dir, arch=None) -> RecallModel:
    model = load_align_model(checkpoint, bert_dir, arch=arch, device=engine["device"])
    sources = {"checkpoint": checkpoint, "bert_dir": bert_dir, "arch": arch}
    return RecallModel("align", model, load_tokenizer(bert_dir), sources, **engine)


def _build_taiyi(engine: dict, taiyi_text_dir, clip_dir, taiyi_text_weights=None) -> RecallModel:
    from .taiyi import load_taiyi, load_taiyi_tokenizer  # transformers: only for taiyi

    model = load_taiyi(taiyi_text_dir, clip_dir, taiyi_text_weights, device=engine["device"])
    sources = {"taiyi_text_dir": taiyi_text_dir, "taiyi_text_weights": taiyi_text_weights, "clip_dir": clip_dir}
    tok = load_taiyi_tokenizer(taiyi_text_dir)
    hash_fn = lambda: model_hash(model.image_model)  # the text tower leaves image vectors as they are
    return RecallModel("taiyi", model, tok, sources, **engine, image_loader=load_clip_image, hash_fn=hash_fn)


MODELS: dict[str, ModelEntry] = {
    "align": ModelEntry(
        _build_align,
        {
            "checkpoint": "align: recall weights (align_model.pth) or a ranker checkpoint",
            "bert_dir": "align: directory with bert-base-chinese config.json and vocab.txt",
            "arch": "align: architecture JSON for a non-default model (models.align.AlignArch)",
        },
        ("checkpoint", "bert_dir"),
        "the paper's recall model (EfficientNet-B3 + 4-layer BERT)",
    ),
    "taiyi": ModelEntry(
        _build_taiyi,
        {
            "taiyi_text_dir": "taiyi: Hugging Face directory of IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese "
            "(config.json, vocab.txt; its weights unless --taiyi-text-weights is given)",
            "taiyi_text_weights": "taiyi: the authors' fine-tuned text encoder (pytorch_model.bin) "
            "replacing the directory's weights",
            "clip_dir": "taiyi: Hugging Face directory of openai/clip-vit-base-patch32 "
            "(config.json and model.safetensors or pytorch_model.bin)",
        },
        ("taiyi_text_dir", "clip_dir"),
        "baseline: Taiyi-CLIP (Chinese RoBERTa text encoder + CLIP ViT-B/32 image tower)",
    ),
}


def build_recall_model(name="align", *, device="cpu", backend="torch", onnx_cache_dir=None, **paths) -> RecallModel:
    """Load recall model ``name`` from ``paths`` (``MODELS[name].options``, the scripts check the required ones)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    engine = {"device": torch.device(device), "backend": backend, "onnx_cache_dir": onnx_cache_dir}
    return MODELS[name].build(engine, **{k: v for k, v in paths.items() if v is not None})
