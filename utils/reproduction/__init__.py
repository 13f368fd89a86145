"""The one-command reproduction's machinery: step records run when their stamp says they
are not done (arguments and inputs unchanged), and the table of the paper's figures beside
ours (``steps``)."""

from utils import front_door

__all__, __getattr__ = front_door(__name__, {"steps": "Step run_step results_table"})
