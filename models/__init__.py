"""Everything that runs a network: the paper's two models (``align``, ``ranker``, with
the text tower of ``bert``), the Taiyi-CLIP baseline (``taiyi``), the one checkpoint
reader and writer (``checkpoint``), the factory (``factory``) and the encoding engine
(``engine``). Scripts use the names below."""

from .align import AlignArch, AlignModel, contrastive_loss, load_tokenizer
from .checkpoint import load_align_model, load_ranker, read_checkpoint, save_align_checkpoint, save_ranker_checkpoint
from .engine import (
    BACKENDS,
    PRECISIONS,
    EmbeddingCache,
    ImagePrefetch,
    PairRun,
    RecallModel,
    evaluate_pairs,
    SelectionModels,
    item_inputs,
    load_selection_models,
    prefetch_images,
    run_selection,
    score_block,
    tokenize,
    wrap_align,
)
from .factory import MODELS, build_ranker, build_recall_model, missing_options
from .ranker import SiameseRanker

__all__ = [
    "AlignArch",
    "AlignModel",
    "BACKENDS",
    "EmbeddingCache",
    "ImagePrefetch",
    "MODELS",
    "PRECISIONS",
    "PairRun",
    "RecallModel",
    "SelectionModels",
    "SiameseRanker",
    "build_ranker",
    "build_recall_model",
    "contrastive_loss",
    "evaluate_pairs",
    "item_inputs",
    "load_align_model",
    "load_ranker",
    "load_selection_models",
    "load_tokenizer",
    "missing_options",
    "prefetch_images",
    "read_checkpoint",
    "run_selection",
    "save_align_checkpoint",
    "save_ranker_checkpoint",
    "score_block",
    "tokenize",
    "wrap_align",
]
