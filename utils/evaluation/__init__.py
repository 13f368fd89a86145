"""Evaluation: figures and intervals of both stages, recall_eval's and rank_eval's pipelines, HTML reports."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "bootstrap": "DEFAULT_DRAWS DEFAULT_SEED LEVEL MAX_DRAWS check_draws fmt_interval mean_intervals",
        "metrics": "DEFAULT_KS RecallResult check_ks evaluate_groups pairwise_metrics recall_at_k roc_auc stable_topk",
        "ranking": "format_pair_summary pair_metrics read_pairs write_pair_outputs",
        "recall": "compare_recall default_json_path evaluate_recall format_compare format_recall",
        "report": "selection_report",
    },
)
