"""The encoding engine: ``RecallModel`` (a model with its tokenizer, preprocessing and
image engine), batched image and text encoding and how the cores are shared
(``encode``), the torch / ONNX Runtime backends (``onnx``), the embedding cache
(``cache``)."""

from utils.args import BACKENDS, PRECISIONS

from .cache import EmbeddingCache
from .encode import ImagePrefetch, encode_images, encode_texts, prefetch_images, tokenize
from .onnx import OnnxBackendError, image_encoder_for
from .recall_model import RecallModel, wrap_align

__all__ = [
    "BACKENDS",
    "EmbeddingCache",
    "ImagePrefetch",
    "OnnxBackendError",
    "PRECISIONS",
    "RecallModel",
    "encode_images",
    "encode_texts",
    "image_encoder_for",
    "prefetch_images",
    "tokenize",
    "wrap_align",
]
