"""reproduce.py's machinery: steps skipped when their stamp says done, and the table of
the paper's figures beside ours."""

from utils import front_door

__all__, __getattr__ = front_door(__name__, {"steps": "Step run_step results_table"})
