"""Selection on a catalogue: items and candidates, statuses, image resolution, output
rows (``catalogue``); the local and Ray runners take the block-scoring function as a
callable."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "catalogue": "DOWNLOAD_FAILED DUPLICATE Item MISSING OK OUTPUT_HEADER UNREADABLE assign_final_ranks "
        "mark_duplicates output_rows read_catalogue resolve_images score_recall set_ranker_scores "
        "shortlist write_output",
    },
)
