"""Everything that runs a network: the paper's models (``align``, ``ranker``, ``bert``), the Taiyi-CLIP
baseline, checkpoints, the model factory, the encoding engine and the recall stage end to end."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "align": "AlignArch AlignModel contrastive_loss load_tokenizer",
        "checkpoint": "CheckpointError convert_to_safetensors load_align_model load_ranker read_checkpoint "
        "save_align_checkpoint save_ranker_checkpoint",
        "engine": "EmbeddingCache PairRun RecallModel SelectionModels evaluate_pairs item_inputs "
        "load_selection_models run_selection score_block tokenize wrap_align",
        "factory": "MODELS build_recall_model",
        "ranker": "SiameseRanker",
        "recall": "RecallJob run_recall",
    },
)
