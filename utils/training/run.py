"""What recall_train.py and rank_train.py share: the --bert-dir check and the run itself."""

from __future__ import annotations

from utils.cli import input_file

import functools
import logging
from pathlib import Path

from .dist import distributed
from .loop import TrainConfig, check_fills_a_step, train

log = logging.getLogger(__name__)


def check_bert_dir(bert_dir: str) -> None:
    for name in ("config.json", "vocab.txt"):
        input_file(Path(bert_dir) / name, "--bert-dir")


def run_training(cfg: TrainConfig, device: str, log_level: str, csv: str, read_pairs, load_model, make_task) -> dict:
    """Under torchrun or not: ``read_pairs()`` -> (train, val, {csv: bad rows left out}); refused when
    ``csv``'s pairs cannot fill a step; then :func:`train` with ``load_model(device, resume_from)``
    and ``make_task(env, train, val, model)``."""
    with distributed(device, log_level) as env:
        train_pairs, val_pairs, skipped = read_pairs()
        check_fills_a_step(len(train_pairs), cfg, env, csv)
        task = functools.partial(make_task, env, train_pairs, val_pairs)
        summary = train(cfg, env, functools.partial(load_model, env.device), task)
    for path, bad in skipped.items():
        if bad:
            log.info("%d bad rows of %s were left out (--skip-bad-rows)", bad, path)
    return summary
