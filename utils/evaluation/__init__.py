"""Evaluation: recall@K / MRR and the pairwise ranking figures (``metrics``), bootstrap
intervals (``bootstrap``), the HTML reports (``report``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "bootstrap": "DEFAULT_DRAWS DEFAULT_SEED LEVEL auc_interval fmt_interval mean_interval mean_intervals",
        "metrics": "DEFAULT_KS RecallResult evaluate_groups evaluate_matrix pairwise_metrics recall_at_k stable_topk",
        "report": "embed_thumbnails esc page summary_spans thumb_img write_page write_recall_report",
    },
)
