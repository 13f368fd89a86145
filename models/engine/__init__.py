"""The encoding engine: ``RecallModel``, batched encoding (``encode``), the ONNX Runtime backend, the
embedding cache, and the pipelines of rank_eval.py (``pairs``) and select_images.py (``selection``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "cache": "EmbeddingCache",
        "encode": "encode_images encode_texts tokenize",
        "onnx": "OnnxBackendError image_encoder_for",
        "pairs": "PairRun evaluate_pairs",
        "recall_model": "RecallModel wrap_align",
        "selection": "SelectionModels item_inputs load_selection_models run_selection score_block",
    },
)
