"""Everything that runs a network: the paper's two models (``align``, ``ranker``, with
the text tower of ``bert``), the Taiyi-CLIP baseline (``taiyi``), the one checkpoint
reader and writer (``checkpoint``), the factory (``factory``), the encoding engine
(``engine``) and the recall stage end to end (``recall``). Scripts use the names below."""

from .align import AlignArch, AlignModel, contrastive_loss, load_tokenizer
from .checkpoint import (
    CheckpointError,
    convert_to_safetensors,
    load_align_model,
    load_ranker,
    read_checkpoint,
    save_align_checkpoint,
    save_ranker_checkpoint,
)
from .engine import (
    BACKENDS,
    PRECISIONS,
    EmbeddingCache,
    ImagePrefetch,
    PairRun,
    RecallModel,
    SelectionModels,
    evaluate_pairs,
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
from .recall import RecallJob, run_recall

__all__ = [
    "AlignArch",
    "AlignModel",
    "BACKENDS",
    "CheckpointError",
    "EmbeddingCache",
    "ImagePrefetch",
    "MODELS",
    "PRECISIONS",
    "PairRun",
    "RecallJob",
    "RecallModel",
    "SelectionModels",
    "SiameseRanker",
    "build_ranker",
    "build_recall_model",
    "contrastive_loss",
    "convert_to_safetensors",
    "evaluate_pairs",
    "item_inputs",
    "load_align_model",
    "load_ranker",
    "load_selection_models",
    "load_tokenizer",
    "missing_options",
    "prefetch_images",
    "read_checkpoint",
    "run_recall",
    "run_selection",
    "save_align_checkpoint",
    "save_ranker_checkpoint",
    "score_block",
    "tokenize",
    "wrap_align",
]
