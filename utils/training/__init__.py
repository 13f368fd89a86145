"""Training, shared by recall_train.py and rank_train.py: the loop with exact resume
(``loop``: ``TrainConfig``, ``Task``, ``train``), processes under torchrun (``dist``),
optimizer and schedules (``optim``), the training state, metrics CSV and out-dir lock
(``state``), the pair readers and input checks (``data``), and what each model's training
is made of (``recall``, ``rank``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "data": "Pair RankPair augment_pil check_text_file encode_images_once read_rank_pairs read_text_pairs "
        "split_owners",
        "dist": "DistEnv distributed gather_with_grad setup_rank_logging",
        "loop": "Task TrainConfig check_fills_a_step train",
        "optim": "Diverged WarmupSchedule",
        "rank": "PairScorer RankPairDataset encode_once validate_pairs",
        "recall": "PairEncoder TextImageDataset TokenizeCollate held_out_recall set_trainable",
        "state": "MetricsWriter deferred_sigint load_train_state read_metrics",
    },
)
