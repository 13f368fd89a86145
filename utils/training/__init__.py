"""Training, shared by recall_train.py and rank_train.py: the loop with exact resume
(``loop``), processes under torchrun (``dist``), what a run leaves in its out-dir
(``state``), and what each model's training is made of: its pairs, dataset, module and
validation (``recall``, ``rank``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "dist": "DistEnv distributed",
        "loop": "Task TrainConfig check_fills_a_step train warmup_schedule",
        "rank": "PairScorer RankPair RankPairDataset augment_pil encode_once read_rank_pairs validate_pairs",
        "recall": "Pair PairEncoder TextImageDataset encode_images_once held_out_recall read_text_pairs split_owners",
        "state": "MetricsWriter deferred_sigint load_train_state read_metrics",
    },
)
