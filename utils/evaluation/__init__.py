"""Evaluation: the figures of both stages (``metrics``), bootstrap intervals
(``bootstrap``), recall_eval.py's pipeline (``recall``), rank_eval.py's figures and files
(``ranking``; its model part is ``models.engine.pairs``), and the HTML reports, recall
and selection, on Jinja2 templates (``report``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "bootstrap": "DEFAULT_DRAWS DEFAULT_SEED LEVEL MAX_DRAWS auc_interval check_draws fmt_interval mean_interval "
        "mean_intervals",
        "metrics": "DEFAULT_KS RecallResult check_ks evaluate_groups evaluate_matrix pairwise_metrics recall_and_mrr "
        "recall_at_k roc_auc stable_topk",
        "ranking": "format_pair_summary pair_metrics read_pairs write_pair_outputs",
        "recall": "compare_recall default_json_path evaluate_recall format_compare format_recall",
        "report": "embed_thumbnails recall_report selection_report",
    },
)
