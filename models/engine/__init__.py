"""The encoding engine: ``RecallModel`` (a model with its tokenizer, preprocessing and
image engine), batched image and text encoding and how the cores are shared
(``encode``), the torch / ONNX Runtime backends (``onnx``), the embedding cache
(``cache``), and rank_eval.py's pipeline over image pairs (``pairs``)."""

from .cache import EmbeddingCache
from .encode import PRECISIONS, ImagePrefetch, prefetch_images, tokenize
from .onnx import BACKENDS
from .pairs import PairRun, evaluate_pairs
from .recall_model import RecallModel, wrap_align
from .selection import SelectionModels, item_inputs, load_selection_models, run_selection, score_block

__all__ = [
    "BACKENDS",
    "EmbeddingCache",
    "ImagePrefetch",
    "PRECISIONS",
    "PairRun",
    "RecallModel",
    "evaluate_pairs",
    "SelectionModels",
    "item_inputs",
    "load_selection_models",
    "prefetch_images",
    "run_selection",
    "score_block",
    "tokenize",
    "wrap_align",
]
