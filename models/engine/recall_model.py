"""``RecallModel``: a loaded model with its tokenizer, image preprocessing and image engine, set up when
first needed. Its weights hash, computed at most once, keys the ONNX export and the embedding cache."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from utils.args import Encoding
from utils.hashing import model_hash

from ..align import load_tokenizer
from ..checkpoint import load_ranker
from .cache import EmbeddingCache
from .encode import encode_images, encode_texts
from .onnx import OnnxImageEncoder, image_encoder_for

log = logging.getLogger(__name__)


@dataclass
class RecallModel:
    name: str
    model: torch.nn.Module  # encode_image(x, normalize), encode_text(ids, mask, normalize), embed_dim
    tokenizer: object
    sources: dict = field(default_factory=dict)  # the files it was built from (for run records)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "torch"  # requested image engine: auto | torch | onnx
    onnx_cache_dir: str | None = None
    image_loader: Callable | None = None  # f(path, mode) -> (tensor, ok); None = the reference preprocessing
    hash_fn: Callable[[], str] | None = None  # weights hash that keys the caches (default: all weights)
    _hash: str | None = None
    _encoders: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = self.hash_fn() if self.hash_fn else model_hash(self.model)
        return self._hash

    def identity(self) -> str:
        """``<name>:<weights hash>``: what the embedding cache keys image vectors by."""
        return f"{self.name}:{self.weights_hash()}"

    def image_encoder(self, precision: str = "fp32"):
        """The ``f(x, normalize)`` running the image tower on the chosen engine, set up once per precision."""
        if precision not in self._encoders:
            self._encoders[precision] = image_encoder_for(
                self.model, self.backend, self.device, precision, self.onnx_cache_dir, self.weights_hash
            )
        return self._encoders[precision]

    def image_backend(self, precision: str = "fp32") -> str:
        """``"onnx"`` or ``"torch"``: the engine that actually runs."""
        return "onnx" if isinstance(self.image_encoder(precision), OnnxImageEncoder) else "torch"

    def engine_info(self, precision: str = "fp32") -> dict:
        """The run record's engine: requested, used (None when no image was encoded), ONNX Runtime's set-up."""
        enc = self._encoders.get(precision)
        info = {"backend": self.backend, "image_backend": None if enc is None else self.image_backend(precision)}
        if isinstance(enc, OnnxImageEncoder):
            info.update(
                onnx_max_abs_diff=enc.max_abs_diff,
                onnx_exported=enc.exported,
                onnx_file=enc.path.name,
                onnx_threads=enc.opts.intra_op_num_threads,
                onnx_setup_s=round(enc.setup_seconds, 3),
            )
        return info

    def encode_images(self, paths, enc: Encoding = Encoding(), *, stats=None, desc: str = "images"):
        """``(emb, ok)`` of image files; the engine is set up only when some image is not in the cache."""
        engine = lambda: self.image_encoder(enc.precision)
        kw = {"engine": engine, "loader": self.image_loader, "stats": stats, "desc": desc}
        with EmbeddingCache(enc.cache_dir, self.identity()) if enc.cache_dir else contextlib.nullcontext() as cache:
            return encode_images(self.model, paths, enc, cache=cache, **kw)

    def encode_texts(self, texts, enc: Encoding = Encoding()):
        return encode_texts(self.model, self.tokenizer, texts, enc)


def wrap_align(model, tokenizer, *, device="cpu", backend="torch", onnx_cache_dir=None, sources=None) -> RecallModel:
    """A ``RecallModel`` around an alignment model in memory (the ranker's copy, a model in training)."""
    return RecallModel("align", model, tokenizer, sources or {}, torch.device(device), backend, onnx_cache_dir)


def load_ranker_model(checkpoint, bert_dir, arch=None, align_checkpoint=None, *, device="cpu", backend="torch"):
    """``(ranker in eval mode, a RecallModel around its recall copy)``."""
    ranker = load_ranker(checkpoint, bert_dir, arch=arch, align_checkpoint=align_checkpoint, device=device)
    sources = {"checkpoint": checkpoint, "bert_dir": bert_dir, "arch": arch, "align_checkpoint": align_checkpoint}
    rm = wrap_align(ranker.align_model, load_tokenizer(bert_dir), device=device, backend=backend, sources=sources)
    return ranker, rm
