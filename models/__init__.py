"""Models of the two-stage selector: the alignment (recall) model and the ranker."""
from .align import AlignArch, AlignModel, contrastive_loss, load_tokenizer, tokenize
from .checkpoint import (CheckpointError, load_align_model, load_ranker, read_checkpoint,
                         save_align_checkpoint, save_ranker_checkpoint, state_dict_hash)
from .ranker import SiameseRanker

__all__ = ["AlignArch", "AlignModel", "contrastive_loss", "load_tokenizer", "tokenize",
           "CheckpointError", "load_align_model", "load_ranker", "read_checkpoint",
           "save_align_checkpoint", "save_ranker_checkpoint", "state_dict_hash", "SiameseRanker"]
