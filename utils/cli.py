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


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def setup_logging(level: int | None = logging.INFO, fmt: str = LOG_FORMAT) -> None:
    """``logging.basicConfig(level, fmt)`` when the root logger has no handler yet
    (``level=None`` leaves the root level as it is)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=fmt)
