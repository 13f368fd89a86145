"""What every script shares: errors (``entry_point``: a ``UserError`` is one line and exit
2, Ctrl-C one line and 130), flag converters, the bad-row rule, path checks, logging.
Imported first by every script, so that Ctrl-C is one line even while imports load."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _say(line: str) -> None:
    """One write, so that torchrun's ranks never mix their lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _interrupted_while_starting(signum, frame) -> None:
    _say(f"{Path(sys.argv[0]).stem}: interrupted")
    os._exit(EXIT_INTERRUPTED)


# Only for a script run as the program: a process that merely imports us keeps its handler.
_PROGRAM = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
_OURS = _PROGRAM.resolve().parent == Path(__file__).resolve().parent.parent or _PROGRAM.name.startswith("avas-")
if _OURS and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _interrupted_while_starting)


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class DataError(UserError, ValueError):
    """A data file that cannot be used as it is; the message names file and line."""


def check_finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise DataError(f"{where}: {value!r} is not a finite number")
    return value


@dataclass(frozen=True)
class RowError:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def record_bad_row(errors: list | None, err: RowError) -> None:
    """A reader's bad row: raised at once (``errors`` None) or collected."""
    if errors is None:
        raise DataError(str(err))
    errors.append(err)


def bad_rows(errors: list, path, skip: bool, shown: int = 20) -> int:
    """The one rule for bad input rows: refused (naming the first) unless ``skip``
    (``--skip-bad-rows``); then each is logged and their count returned."""
    if not errors:
        return 0
    if not skip:
        more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
        raise DataError(f"{errors[0]}{more} bad row(s) in {path}; fix them, or --skip-bad-rows to leave them out")
    log = logging.getLogger("bad_rows")
    for e in errors[:shown]:
        log.warning("bad row left out: %s", e)
    if len(errors) > shown:
        log.warning("... and %d more bad rows left out of %s", len(errors) - shown, path)
    return len(errors)


def distinct_paths(inputs: dict, outputs: dict) -> None:
    """No output (``{flag: path}``, None ignored) is an input or another output."""
    seen: dict[str, str] = {}
    for flag, path in inputs.items():
        if path is not None:
            seen.setdefault(os.path.realpath(path), f"input {flag}")
    for flag, path in outputs.items():
        if path is not None:
            real = os.path.realpath(path)
            if real in seen:
                raise UserError(f"{flag} {path}: the same file as {seen[real]}; refusing to overwrite it")
            seen[real] = flag


def one_line(msg: object) -> str:
    parts = [s.strip() for s in str(msg).splitlines() if s.strip()]
    return "; ".join(parts) if parts else type(msg).__name__


def entry_point(main):
    """Wrap a script's ``main(argv=None) -> int``; anything but a ``UserError`` keeps its traceback."""
    prog = Path(main.__code__.co_filename).stem

    @functools.wraps(main)
    def run(argv=None) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here: KeyboardInterrupt
        try:
            return main(argv)
        except UserError as e:
            _say(f"{prog}: error: {one_line(e)}")
            return EXIT_USAGE
        except KeyboardInterrupt:
            _say(f"{prog}: interrupted")
            return EXIT_INTERRUPTED

    return run


# --- flag converters (argparse ``type=``) --------------------------------------------------
def _number(kind, ok, what: str):
    """An argparse ``type=``: a finite ``kind`` for which ``ok`` holds, else an error naming ``what``."""

    def convert(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return convert


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _number(float, lambda v: True, "a finite number")
positive_float = _number(float, lambda v: v > 0, "a number > 0")  # a timeout of 0 would fail every request
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def count_or_percent(text: str) -> str:
    """``N`` or ``P%`` (>= 0), kept as written; :func:`allowed_count` reads it."""
    if not re.fullmatch(r"\d+|(\d+(\.\d*)?|\.\d+)%", text):
        raise argparse.ArgumentTypeError(f"expected N or P% (>= 0), got {text!r}")
    return text


def allowed_count(spec: str, total: int) -> int:
    return int(total * float(spec[:-1]) / 100.0) if spec.endswith("%") else int(spec)


# --- logging and the device ----------------------------------------------------------------
def setup_logging(level: str | int | None = "INFO", fmt: str = LOG_FORMAT) -> None:
    """One stderr handler on the root logger, unless one exists (pytest); ``None`` keeps the level."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=fmt)
    if level is not None:
        root.setLevel(level)


@contextlib.contextmanager
def logging_to(path, fmt: str = LOG_FORMAT, logger: logging.Logger | None = None, alone: bool = False):
    """``logger`` (default: the root) also appends to ``path`` while the block runs (``alone``: only there, not to
    the handlers above it), never through a symbolic link (our lines would land in its target)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "is a symbolic link" if os.path.islink(path) else (e.strerror or str(e))
        raise UserError(f"log file {path}: {why}; refusing to write it") from None
    logger, handler = logger or logging.getLogger(), logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, logger.propagate and not alone
    try:
        yield handler
    finally:  # the logger as it was: the process may go on (reproduce.py, a notebook)
        logger.propagate = propagate
        logger.removeHandler(handler)
        handler.close()


def resolve_device(name: str = "auto"):
    """``--device``: ``auto`` takes CUDA when present; CUDA without a GPU is a ``UserError``."""
    import torch  # here: scripts that never run a model start without torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: no CUDA device is available on this machine (torch {torch.__version__}, "
            f"built with CUDA: {torch.version.cuda}); use --device cpu or auto"
        )
    return torch.device(name)


# --- paths, checked before the work starts -------------------------------------------------
def _label(what: str | None, path) -> str:
    return f"{what} {path}" if what else str(path)


def _existing(path, what: str | None, is_kind, noun: str, probe) -> Path:
    p, label = Path(path), _label(what, path)
    if not is_kind(p):
        raise UserError(f"{label}: {'not a' if p.exists() else 'no such'} {noun}")
    try:
        probe(p)
    except OSError as e:
        raise UserError(f"{label}: cannot be read ({e.strerror})") from None
    return p


def input_file(path, what: str | None = None) -> Path:
    """An existing, readable regular file."""
    return _existing(path, what, Path.is_file, "file", lambda p: open(p, "rb").close())


def input_dir(path, what: str | None = None) -> Path:
    """An existing directory whose entries can be listed."""
    return _existing(path, what, Path.is_dir, "directory", lambda p: next(os.scandir(p), None))


def _writable_dir(d: Path, label: str) -> None:
    """``d``, or its first existing ancestor, takes a new file (probed with a real one)."""
    while not d.exists() and d.parent != d:
        d = d.parent
    if not d.is_dir():
        raise UserError(f"{label}: {d} is not a directory")
    try:
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise UserError(f"{label}: cannot write in {d} ({e.strerror})") from None


def output_file(path, what: str | None = None) -> Path:
    """A place a file can be written (not a directory, not under a plain file); nothing is created."""
    p, label = Path(path), _label(what, path)
    if p.is_dir():
        raise UserError(f"{label}: is a directory, expected a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{label}: the file is not writable")
    _writable_dir(p.parent, label)
    return p


def output_dir(path, what: str | None = None) -> Path:
    """A directory that exists and is writable, or can be made. Nothing is created."""
    p, label = Path(path), _label(what, path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{label}: exists and is not a directory")
    _writable_dir(p, label)
    return p


def check_files(inputs: dict | None = None, dirs=None, outputs: dict | None = None, out_dirs=None) -> None:
    """A run's paths (``{flag: path}``, None skipped) before any work: ``inputs`` readable files,
    ``dirs`` listable, ``outputs`` writable files, ``out_dirs`` writable directories, and no
    output an input or another output."""
    inputs, outputs = inputs or {}, outputs or {}
    for check, paths in ((input_file, inputs), (input_dir, dirs), (output_file, outputs), (output_dir, out_dirs)):
        for flag, path in (paths or {}).items():
            if path is not None:
                check(path, flag)
    distinct_paths(inputs, outputs)


def require(module: str, extra: str, needed_by: str) -> None:
    """``module`` is installed (not imported), else a ``UserError`` naming the extra that brings it."""
    import importlib.util
    from importlib import metadata

    with contextlib.suppress(ImportError):  # its parent package is missing
        if importlib.util.find_spec(module) is not None:
            return
    try:
        metadata.distribution("avas-repro")
        how = f"pip install 'avas-repro[{extra}]'"
    except metadata.PackageNotFoundError:  # a clone set up with the requirements files
        how = f"pip install -e '.[{extra}]' in the clone"
    req = Path(__file__).resolve().parent.parent / f"requirements-{extra}.txt"
    also = f" (or pip install -r {req.name})" if req.is_file() else ""
    raise UserError(f"{needed_by} needs the optional package {module}, which is not installed: {how}{also}")
