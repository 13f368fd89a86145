"""What a run leaves in its --out-dir besides the checkpoints: the training state that
resumes it exactly (optimizer, schedule, scaler, position), the metrics CSV, and the
out-dir's lock for the run."""

from __future__ import annotations

from utils.cli import UserError

import contextlib
import csv
import logging
import os
import signal
import threading
from pathlib import Path

import torch

from utils.io import atomic_write, exclusive_lock, text_lines

from .dist import DistEnv

log = logging.getLogger(__name__)

STATE_FORMAT = 1


def read_metrics(path) -> list[dict]:
    return list(csv.DictReader(text_lines(path)))


class MetricsWriter:
    """Rows appended to a CSV with a fixed header, by rank 0 only. On resume, ``keep_rows``
    keeps the rows written when the state was saved, so the CSV reads like an
    uninterrupted run's."""

    def __init__(self, path, fields: list[str], env: DistEnv, keep_rows: int | None = None):
        self.path, self.fields, self.env, self.rows = str(path), list(fields), env, 0
        if not env.is_main:
            return
        old = read_metrics(self.path)[:keep_rows] if keep_rows is not None and os.path.exists(self.path) else []
        if keep_rows is not None and len(old) < keep_rows:
            log.warning("%s: holds %d rows, the training state expected %d", self.path, len(old), keep_rows)
        with atomic_write(self.path) as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
        self.rows = len(old)

    def write(self, **row) -> None:
        if not self.env.is_main:
            return
        with open(self.path, "a", encoding="utf-8", newline="") as f:  # one line a step, not a rewrite
            row = {k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()}
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
        self.rows += 1


def load_train_state(path) -> dict:
    """The state ``train`` saves; a missing, damaged or foreign file is a ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no training state to resume from (was --out-dir the directory of an earlier run?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle with code
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError):  # torch reports some truncated files so
            why = e.strerror or why
        raise UserError(f"{path}: cannot be read as a training state ({why}); start again without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not a training state file of this package")
    return state


@contextlib.contextmanager
def deferred_sigint():
    """Hold a Ctrl-C that arrives during the block and raise it after, so that a checkpoint
    and its training state are written as a pair. Outside the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if got:
        raise KeyboardInterrupt


def _remove_stale_temp_files(directory: Path) -> None:
    """Remove the ``<file>.tmp<pid>`` files a killed save left (a live process's stay)."""
    for p in sorted(directory.glob("*.tmp*")):
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and p.is_file():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                log.info("%s: removed, the temporary file of an interrupted save", p)
                p.unlink(missing_ok=True)
            except PermissionError:  # someone else's live process
                pass


@contextlib.contextmanager
def out_dir_lock(out: Path, env: DistEnv):
    """``utils.io.exclusive_lock`` on ``out`` for a whole run: rank 0 takes it (and removes
    stale temporary files) and tells the others, so every process stops with the same
    line. A directory this run created is removed again if it is left empty."""
    created = not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            error = None
            if env.is_main:
                try:
                    stack.enter_context(exclusive_lock(out))
                except UserError as e:
                    error = str(e)
                else:
                    _remove_stale_temp_files(out)
            error = env.broadcast(error)
            if error:
                raise UserError(error)
            yield out
    finally:
        if created and env.is_main:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
