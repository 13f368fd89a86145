"""Command-line pieces shared by the top-level scripts.

- ``positive_int`` / ``non_negative_int``: argparse ``type=`` converters whose errors
  name the bad value (``expected a positive integer, got 'x'``).
- ``setup_logging``: a root handler on stderr unless one exists already (a caller such
  as reproduce.py or pytest may have installed its own), so a script run in-process
  through ``main(argv)`` never adds a second one.
"""
from __future__ import annotations

import argparse
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def setup_logging(level: int | None = logging.INFO, fmt: str = LOG_FORMAT) -> None:
    """``logging.basicConfig(level, fmt)`` when the root logger has no handler yet
    (``level=None`` leaves the root level as it is)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=fmt)
