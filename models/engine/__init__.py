"""The encoding engine: ``RecallModel`` (a model with its tokenizer, preprocessing and
image engine), batched encoding and how the cores are shared (``encode``), the torch /
ONNX Runtime backends (``onnx``), the embedding cache (``cache``), rank_eval.py's pipeline
over image pairs (``pairs``) and select_images.py's models (``selection``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "cache": "EmbeddingCache",
        "encode": "ImagePrefetch encode_images encode_texts prefetch_images tokenize",
        "onnx": "OnnxBackendError image_encoder_for",
        "pairs": "PairRun evaluate_pairs",
        "recall_model": "RecallModel wrap_align",
        "selection": "SelectionModels item_inputs load_selection_models run_selection score_block",
    },
)
