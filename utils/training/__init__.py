"""Training, shared by recall_train.py and rank_train.py: the loop with exact resume
(``loop``), processes under torchrun (``dist``), what a run leaves in its out-dir
(``state``), the pair readers (``data``), and what each model's training is made of
(``recall``, ``rank``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "data": "Pair RankPair check_text_file encode_images_once read_rank_pairs read_text_pairs split_owners",
        "dist": "DistEnv distributed gather_with_grad",
        "loop": "Task TrainConfig WarmupSchedule check_fills_a_step train",
        "rank": "PairScorer RankPairDataset augment_pil encode_once validate_pairs",
        "recall": "PairEncoder TextImageDataset held_out_recall set_trainable",
        "state": "MetricsWriter deferred_sigint load_train_state read_metrics",
    },
)
