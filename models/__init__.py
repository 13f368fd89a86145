"""Models of the two-stage selector: the alignment (recall) model and the ranker."""
