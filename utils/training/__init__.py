"""Training for recall_train.py and rank_train.py: the run and its loop with exact resume, the processes under
torchrun (``dist``), each model's pairs, dataset, module and validation (``recall``, ``rank``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "dist": "DistEnv deferred_sigint distributed",
        "loop": "MetricsWriter Task TrainConfig load_train_state read_metrics run_training train warmup_schedule",
        "rank": "PairScorer RankPair RankPairDataset augment_pil encode_once read_rank_pairs validate_pairs",
        "recall": "Pair PairEncoder TextImageDataset encode_images_once held_out_recall read_text_pairs split_owners",
    },
)
