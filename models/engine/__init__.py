"""The encoding engine: ``RecallModel`` (a model with its tokenizer, preprocessing and
image engine), batched image and text encoding and how the cores are shared
(``encode``), the torch / ONNX Runtime backends (``onnx``), the embedding cache
(``cache``), and rank_eval.py's pipeline over image pairs (``pairs``)."""

from utils.args import BACKENDS, PRECISIONS

from .cache import EmbeddingCache
from .encode import ImagePrefetch, encode_images, encode_texts, prefetch_images, tokenize
from .onnx import OnnxBackendError, image_encoder_for
from .pairs import PairRun, evaluate_pairs
from .recall_model import RecallModel, wrap_align
from .selection import SelectionModels, item_inputs, load_selection_models, run_selection, score_block

__all__ = [
    "BACKENDS",
    "EmbeddingCache",
    "ImagePrefetch",
    "OnnxBackendError",
    "PRECISIONS",
    "PairRun",
    "RecallModel",
    "SelectionModels",
    "encode_images",
    "encode_texts",
    "evaluate_pairs",
    "image_encoder_for",
    "item_inputs",
    "load_selection_models",
    "prefetch_images",
    "run_selection",
    "score_block",
    "tokenize",
    "wrap_align",
]
