"""The one way to build a model: recall models by name, the ranker, and the wrapper that
gives any loaded alignment-style model its tokenizer, image preprocessing and image
engine.

    rm = build_recall_model("align", checkpoint="align_model.pth", bert_dir="bert",
                            device="cpu", backend="auto")                 # a RecallModel
    emb, ok = rm.encode_images(paths, batch_size=32)                      # N x D, normalised
    txt = rm.encode_texts(["西湖"])                                        # 1 x D, normalised
    rm.identity()                     # "<name>:<weights sha256>": the embedding-cache tag
    rm.engine_info()                  # {"backend": "auto", "image_backend": "onnx", ...}

    ranker, rm = build_ranker("ranker.ckpt", "bert", device="cpu", backend="auto")
    # ranker.score_many(...) for the head; rm encodes with ranker.align_model

Registered recall models (``MODELS``):

* ``align``: the paper's model (models/align.py) from ``checkpoint`` and ``bert_dir``
  (``arch`` for small variants); reference preprocessing; identity = hash of all weights.
* ``taiyi``: the Taiyi-CLIP baseline (models/taiyi.py) from ``taiyi_text_dir``
  (``taiyi_text_weights`` for the authors' fine-tuned text encoder) and ``clip_dir``; CLIP
  preprocessing; identity = hash of the image tower only (the fine-tuned and the original
  text encoders share cached image vectors).

A third model: write its builder and add one ``ModelEntry`` to ``MODELS``.

Image engine (``backend``, utils/onnx_backend.py): ``torch``, ``onnx`` or ``auto`` (ONNX
Runtime on a CPU when it is installed and agrees with torch on this model, else torch).
It is chosen when first needed (``image_encoder``/``encode_images``), so a run that
encodes no image never exports. The weights hash is computed at most once per model and
serves both the ONNX export cache and the embedding cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from utils.embed import MAX_TEXT_LEN, encode_images, encode_texts
from utils.hashing import model_hash
from utils.images import load_clip_image
from utils.onnx_backend import OnnxImageEncoder, image_encoder_for


@dataclass
class RecallModel:
    """A loaded recall model with its tokenizer, image preprocessing and image engine."""
    name: str
    model: torch.nn.Module                 # encode_image(x, normalize), encode_text(ids, mask, normalize)
    tokenizer: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "torch"                 # requested image engine: auto | torch | onnx
    image_loader: Callable | None = None   # f(path, mode) -> (tensor, ok); None = utils.images.load_image
    max_text_len: int = MAX_TEXT_LEN
    hash_fn: Callable[[], str] | None = None   # weights hash that keys the caches (default: all weights)
    sources: dict = field(default_factory=dict)  # which files it was built from (for run records)
    onnx_cache_dir: str | None = None
    _hash: str | None = None
    _encoders: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        arch = getattr(self.model, "arch", None)
        return arch.embed_dim if arch is not None else self.model.embed_dim

    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = (self.hash_fn or (lambda: model_hash(self.model)))()
        return self._hash

    def identity(self) -> str:
        """``<name>:<weights hash>``: what the embedding cache keys image vectors by."""
        return f"{self.name}:{self.weights_hash()}"

    def image_encoder(self, precision: str = "fp32"):
        """The ``f(x, normalize)`` running the image tower on the chosen engine (built
        once per precision; ``auto`` is resolved here, with its agreement check)."""
        if precision not in self._encoders:
            self._encoders[precision] = image_encoder_for(
                self.model, self.backend, self.device, precision, cache_dir=self.onnx_cache_dir,
                weights_hash=self.weights_hash)
        return self._encoders[precision]

    def image_backend(self, precision: str = "fp32") -> str:
        """``"onnx"`` or ``"torch"``: the engine that actually runs."""
        return "onnx" if isinstance(self.image_encoder(precision), OnnxImageEncoder) else "torch"

    def engine_info(self, precision: str = "fp32") -> dict:
        """What a run record says about the image engine: the one requested, the one
        used (None when no image needed encoding, so none was set up), and for ONNX
        Runtime its agreement with torch, whether this run exported the graph (False:
        the cached export was valid) and its set-up time."""
        if precision not in self._encoders:
            return {"backend": self.backend, "image_backend": None}
        enc = self.image_encoder(precision)
        info = {"backend": self.backend, "image_backend": self.image_backend(precision)}
        if isinstance(enc, OnnxImageEncoder):
            info.update(onnx_max_abs_diff=enc.max_abs_diff, onnx_exported=enc.exported,
                        onnx_file=enc.path.name, onnx_threads=enc.opts.intra_op_num_threads,
                        onnx_setup_s=round(enc.setup_seconds, 3))
        return info

    def encode_images(self, paths, batch_size=None, precision: str = "fp32", **kw):
        """``utils.embed.encode_images`` on the chosen engine, which is set up only when
        some image is not in the cache."""
        return encode_images(self.model, paths, batch_size, self.device, precision=precision,
                             image_loader=self.image_loader,
                             engine=lambda: self.image_encoder(precision), **kw)

    def encode_texts(self, texts, batch_size: int | None = None, **kw):
        return encode_texts(self.model, self.tokenizer, texts, batch_size, self.device,
                            max_length=self.max_text_len, **kw)


def wrap_align(model, tokenizer, *, device="cpu", backend: str = "torch",
               onnx_cache_dir=None, sources: dict | None = None) -> RecallModel:
    """A ``RecallModel`` around an alignment model already in memory (the ranker's own
    copy, a model being trained)."""
    return RecallModel("align", model, tokenizer, torch.device(device), backend,
                       sources=sources or {}, onnx_cache_dir=onnx_cache_dir)


@dataclass
class ModelEntry:
    build: Callable[..., RecallModel]      # build(device=..., backend=..., **paths)
    options: dict[str, str]                # path option name -> help (scripts make flags of them)
    required: tuple[str, ...]              # options that must be given
    help: str
    image_loader: Callable | None = None   # its preprocessing (known before the model is built,
                                           # so decoding can start while it loads)


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------
def _build_align(device, backend, onnx_cache_dir, checkpoint, bert_dir, arch=None) -> RecallModel:
    from .align import load_tokenizer
    from .checkpoint import load_align_model
    model = load_align_model(checkpoint, bert_dir, arch=arch, device=device)
    return wrap_align(model, load_tokenizer(bert_dir), device=device, backend=backend,
                      onnx_cache_dir=onnx_cache_dir,
                      sources={"checkpoint": checkpoint, "bert_dir": bert_dir, "arch": arch})


def _build_taiyi(device, backend, onnx_cache_dir, taiyi_text_dir, clip_dir,
                 taiyi_text_weights=None) -> RecallModel:
    from .taiyi import TAIYI_MAX_TEXT_LEN, load_taiyi, load_taiyi_tokenizer
    model = load_taiyi(taiyi_text_dir, clip_dir, taiyi_text_weights, device=device)
    return RecallModel("taiyi", model, load_taiyi_tokenizer(taiyi_text_dir), torch.device(device),
                       backend, load_clip_image, TAIYI_MAX_TEXT_LEN,
                       lambda: model_hash(model.image_model),
                       {"taiyi_text_dir": taiyi_text_dir, "taiyi_text_weights": taiyi_text_weights,
                        "clip_dir": clip_dir}, onnx_cache_dir)


MODELS: dict[str, ModelEntry] = {
    "align": ModelEntry(
        _build_align,
        {"checkpoint": "align: recall weights (align_model.pth) or a ranker checkpoint",
         "bert_dir": "align: directory with bert-base-chinese config.json and vocab.txt",
         "arch": "align: architecture JSON for a non-default model (models.align.AlignArch)"},
        ("checkpoint", "bert_dir"),
        "the paper's recall model (EfficientNet-B3 + 4-layer BERT)"),
    "taiyi": ModelEntry(
        _build_taiyi,
        {"taiyi_text_dir": "taiyi: Hugging Face directory of IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese "
                           "(config.json, vocab.txt; its weights unless --taiyi-text-weights is given)",
         "taiyi_text_weights": "taiyi: the authors' fine-tuned text encoder (pytorch_model.bin) "
                               "replacing the directory's weights",
         "clip_dir": "taiyi: Hugging Face directory of openai/clip-vit-base-patch32 "
                     "(config.json and model.safetensors or pytorch_model.bin)"},
        ("taiyi_text_dir", "clip_dir"),
        "baseline: Taiyi-CLIP (Chinese RoBERTa text encoder + CLIP ViT-B/32 image tower)",
        load_clip_image),
}


def missing_options(name: str, paths: dict) -> list[str]:
    """The required path options of model ``name`` that ``paths`` lacks."""
    return [k for k in MODELS[name].required if paths.get(k) in (None, "")]


def build_recall_model(name: str = "align", *, device="cpu", backend: str = "torch",
                       onnx_cache_dir=None, **paths) -> RecallModel:
    """Load recall model ``name`` from ``paths`` (its ``MODELS[name].options``); raises
    CheckpointError / FileNotFoundError / ValueError with a message naming the file."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    entry = MODELS[name]
    unknown = sorted(set(paths) - set(entry.options))
    if unknown:
        raise TypeError(f"model {name} takes no option {', '.join(unknown)}")
    missing = missing_options(name, paths)
    if missing:
        raise ValueError(f"model {name} needs {', '.join(missing)}")
    return entry.build(torch.device(device), backend, onnx_cache_dir,
                       **{k: v for k, v in paths.items() if v is not None})


def build_ranker(checkpoint, bert_dir, *, arch=None, align_checkpoint=None, device="cpu",
                 backend: str = "torch", onnx_cache_dir=None):
    """``(ranker, rm)``: the siamese ranker (its recall copy restored from the same file,
    or replaced by ``align_checkpoint``) and a ``RecallModel`` around that copy."""
    from .align import load_tokenizer
    from .checkpoint import load_ranker
    ranker = load_ranker(checkpoint, bert_dir, arch=arch, align_checkpoint=align_checkpoint,
                         device=device)
    rm = wrap_align(ranker.align_model, load_tokenizer(bert_dir), device=device, backend=backend,
                    onnx_cache_dir=onnx_cache_dir,
                    sources={"checkpoint": checkpoint, "bert_dir": bert_dir, "arch": arch,
                             "align_checkpoint": align_checkpoint})
    return ranker, rm
