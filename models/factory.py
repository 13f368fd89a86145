"""The one way to build a model: recall models by name (``MODELS``: ``align``, the paper's;
``taiyi``, the baseline) and the ranker, each wrapped in a ``RecallModel``.

    rm = build_recall_model("align", checkpoint="align_model.pth", bert_dir="bert", backend="auto")
    ranker, rm = build_ranker("ranker.ckpt", "bert")  # rm encodes with ranker.align_model

A third model: a builder and one ``ModelEntry``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from utils.formats import load_clip_image
from utils.hashing import model_hash

from .align import load_tokenizer
from .checkpoint import load_align_model, load_ranker
from .engine import RecallModel, wrap_align


@dataclass
class ModelEntry:
    build: Callable[..., RecallModel]  # build(device, backend, onnx_cache_dir, **paths)
    options: dict[str, str]  # path option name -> help (scripts make flags of them)
    required: tuple[str, ...]  # options that must be given
    help: str
    image_loader: Callable | None = None  # its preprocessing, known before the model loads (decoding ahead)


def _build_align(device, backend, onnx_cache_dir, checkpoint, bert_dir, arch=None) -> RecallModel:
    model = load_align_model(checkpoint, bert_dir, arch=arch, device=device)
    sources = {"checkpoint": checkpoint, "bert_dir": bert_dir, "arch": arch}
    return wrap_align(
        model, load_tokenizer(bert_dir), device=device, backend=backend, onnx_cache_dir=onnx_cache_dir, sources=sources
    )


def _build_taiyi(device, backend, onnx_cache_dir, taiyi_text_dir, clip_dir, taiyi_text_weights=None) -> RecallModel:
    from .taiyi import TAIYI_MAX_TEXT_LEN, load_taiyi, load_taiyi_tokenizer  # transformers: only for taiyi

    model = load_taiyi(taiyi_text_dir, clip_dir, taiyi_text_weights, device=device)
    tok = load_taiyi_tokenizer(taiyi_text_dir)
    sources = {"taiyi_text_dir": taiyi_text_dir, "taiyi_text_weights": taiyi_text_weights, "clip_dir": clip_dir}
    hash_fn = lambda: model_hash(model.image_model)  # the text tower leaves image vectors as they are
    return RecallModel(
        "taiyi", model, tok, device, backend, load_clip_image, TAIYI_MAX_TEXT_LEN, hash_fn, sources, onnx_cache_dir
    )


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
        load_clip_image,
    ),
}


def missing_options(name: str, paths: dict) -> list[str]:
    """The required path options of model ``name`` that ``paths`` lacks."""
    return [k for k in MODELS[name].required if paths.get(k) in (None, "")]


def build_recall_model(
    name: str = "align", *, device="cpu", backend: str = "torch", onnx_cache_dir=None, **paths
) -> RecallModel:
    """Load recall model ``name`` from ``paths`` (its ``MODELS[name].options``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    unknown = sorted(set(paths) - set(MODELS[name].options))
    if unknown:
        raise TypeError(f"model {name} takes no option {', '.join(unknown)}")
    missing = missing_options(name, paths)
    if missing:
        raise ValueError(f"model {name} needs {', '.join(missing)}")
    given = {k: v for k, v in paths.items() if v is not None}
    return MODELS[name].build(torch.device(device), backend, onnx_cache_dir, **given)


def build_ranker(
    checkpoint, bert_dir, *, arch=None, align_checkpoint=None, device="cpu", backend: str = "torch", onnx_cache_dir=None
):
    """``(ranker, rm)``: the siamese ranker (its recall copy restored from the same file,
    or replaced by ``align_checkpoint``) and a ``RecallModel`` around that copy."""
    ranker = load_ranker(checkpoint, bert_dir, arch=arch, align_checkpoint=align_checkpoint, device=device)
    sources = {"checkpoint": checkpoint, "bert_dir": bert_dir, "arch": arch, "align_checkpoint": align_checkpoint}
    rm = wrap_align(
        ranker.align_model,
        load_tokenizer(bert_dir),
        device=device,
        backend=backend,
        onnx_cache_dir=onnx_cache_dir,
        sources=sources,
    )
    return ranker, rm
