"""The command-line conventions every script shares, in one place.

    p = argparse.ArgumentParser(...)
    cli.add_common_args(p)                 # --device, --no-progress, --log-level
    ...
    @cli.entry_point
    def main(argv=None) -> int:
        args = p.parse_args(argv)
        cli.setup_logging(args.log_level)
        out = cli.output_file(args.output, "--output")     # checked before any work
        ...

- ``UserError``: a mistake of the user's (a bad file, flag or key). Every error type of
  the project that means "bad input" derives from it (``utils.data.DataError``,
  ``models.checkpoint.CheckpointError``, ``utils.poi.PoiTableError`` ...).
- ``entry_point``: wraps a script's ``main``: a ``UserError`` becomes ONE line on stderr
  and exit status 2, Ctrl-C one line and 130; no traceback for either.
- ``input_file`` / ``input_dir`` / ``output_file`` / ``output_dir``: the checks a script
  runs on its paths before the expensive work starts (readable input, writable output
  location that is not a directory or under a plain file).
- ``positive_int`` / ``non_negative_int``: argparse ``type=`` converters.
- ``setup_logging``: one stderr handler (none added when a caller installed one).
- ``resolve_device``: ``--device auto|cpu|cuda``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import math
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _interrupted_while_starting(signum, frame) -> None:
    _say(f"{Path(sys.argv[0]).stem}: interrupted")
    os._exit(EXIT_INTERRUPTED)


# A script run as the program (``python recall_infer.py``, ``avas-recall-infer``) says Ctrl-C
# in one line and 130 even while its imports run, before ``entry_point`` takes over; a
# process that merely imports us keeps its handler.
_PROGRAM = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
if (_PROGRAM.resolve().parent == Path(__file__).resolve().parent.parent or _PROGRAM.name.startswith("avas-")) and (
    threading.current_thread() is threading.main_thread()
):
    signal.signal(signal.SIGINT, _interrupted_while_starting)


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class DataError(UserError, ValueError):
    """A data file that cannot be used as it is; the message names file and line."""


def check_finite(value: float, where: str) -> float:
    """``value`` unless it is NaN or infinite (then a ``DataError`` naming ``where``)."""
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
    """The one rule for bad input rows, in every script (and on every worker that read
    rows): refused, as a ``DataError`` naming the first and how many, unless ``skip``
    (``--skip-bad-rows``): then each is logged by file and line (the first ``shown``) and
    their count is returned for the summary."""
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
    """No output is one of the inputs or another output (compared resolved); ``{flag:
    path}``, None values ignored."""
    seen: dict[str, str] = {}
    for flag, path in inputs.items():
        if path is not None:
            seen.setdefault(os.path.realpath(path), f"input {flag}")
    for flag, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"{flag} {path}: the same file as {seen[real]}; refusing to overwrite it")
        seen[real] = flag


def one_line(msg: object) -> str:
    """A message on one line (multi-line messages, e.g. key listings, joined by '; ')."""
    parts = [s.strip() for s in str(msg).splitlines() if s.strip()]
    return "; ".join(parts) if parts else type(msg).__name__


def _say(line: str) -> None:
    """``line`` on stderr in ONE write (with its newline), so that processes sharing the
    stream (torchrun's ranks) never run their lines together, buffered or not."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def entry_point(main):
    """Decorate a script's ``main(argv=None) -> int``: ``UserError`` -> one line on
    stderr and 2; ``KeyboardInterrupt`` -> one line and 130. Anything else is a bug and
    keeps its traceback. Run as the program (``__main__``), the objects left at the end
    are frozen out of the garbage collector: the interpreter's exit then skips a
    collection over the million objects torch and transformers create (0.7 s here)."""
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
        finally:
            if main.__module__ == "__main__":
                gc.freeze()

    return run


# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------
# --num-workers of the scripts that encode images (utils.embed decides the defaults)
DECODE_WORKERS_HELP = (
    "image decoding worker processes (default: by core count and engine, "
    "utils.embed.default_num_workers; 0 = none). With ONNX Runtime on a CPU "
    "the engine's lanes decode, and workers only decode the first images "
    "while the model loads"
)


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


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite."""
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite float > 0 (a timeout of 0 would fail every request)."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def count_or_percent(text: str) -> str:
    """``N`` (an integer >= 0) or ``P%`` (a percentage >= 0), kept as written; see
    :func:`allowed_count`."""
    import re

    if not re.fullmatch(r"\d+|(\d+(\.\d*)?|\.\d+)%", text):
        raise argparse.ArgumentTypeError(f"expected N or P% (>= 0), got {text!r}")
    return text


def allowed_count(spec: str, total: int) -> int:
    """What a :func:`count_or_percent` ``spec`` allows out of ``total``."""
    return int(total * float(spec[:-1]) / 100.0) if spec.endswith("%") else int(spec)


def add_common_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    """``--device`` (when a model runs), ``--no-progress`` and ``--log-level``."""
    if device:
        p.add_argument(
            "--device",
            choices=DEVICE_CHOICES,
            default="auto",
            help="where models run: auto = CUDA when present, else CPU (default auto)",
        )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=LOG_LEVELS,
        type=str.upper,
        help="log messages of this level and above on stderr (default INFO)",
    )


def setup_logging(level: str | int | None = "INFO", fmt: str = LOG_FORMAT) -> None:
    """One stderr handler on the root logger; when one exists already (a caller such as
    reproduce.py or pytest installed it) only the level is set. ``None`` keeps the level."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=fmt)
    if level is not None:
        root.setLevel(level)


def log_file_handler(path, fmt: str = LOG_FORMAT) -> logging.Handler:
    """A handler appending to the log file ``path``, opened without following a symbolic
    link (one planted there would make our lines land in its target)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "is a symbolic link" if os.path.islink(path) else (e.strerror or str(e))
        raise UserError(f"log file {path}: {why}; refusing to write it") from None
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter(fmt))
    return handler


def resolve_device(name: str = "auto"):
    """``auto`` takes CUDA when present. Asking for CUDA without a GPU is a ``UserError``
    that says so, rather than a traceback from deep inside torch."""
    import torch  # here: scripts that never run a model start without torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: no CUDA device is available on this machine "
            f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda}); "
            f"use --device cpu or auto"
        )
    return torch.device(name)


# ---------------------------------------------------------------------------
# paths, checked before the work starts
# ---------------------------------------------------------------------------
def _label(what: str | None, path) -> str:
    return f"{what} {path}" if what else str(path)


def input_file(path, what: str | None = None) -> Path:
    """An existing, readable regular file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{_label(what, path)}: no such file")
    if not p.is_file():
        raise UserError(f"{_label(what, path)}: not a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise UserError(f"{_label(what, path)}: cannot be read ({e.strerror})") from None
    return p


def input_dir(path, what: str | None = None) -> Path:
    """An existing directory whose entries can be listed."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{_label(what, path)}: no such directory")
    if not p.is_dir():
        raise UserError(f"{_label(what, path)}: not a directory")
    try:
        next(os.scandir(p), None)
    except OSError as e:
        raise UserError(f"{_label(what, path)}: cannot be read ({e.strerror})") from None
    return p


def _writable_dir(d: Path, label: str) -> None:
    """``d`` (or, when it does not exist yet, its first existing ancestor) is a
    directory in which a file can be created: probed with a real temporary file."""
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{label}: {probe} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-probe-", dir=probe)
    except OSError as e:
        raise UserError(f"{label}: cannot write in {probe} ({e.strerror})") from None
    os.close(fd)
    os.unlink(tmp)


def output_file(path, what: str | None = None) -> Path:
    """A place a file can be written: not a directory, not under a plain file, in a
    directory that exists (or can be made) and is writable. Nothing is created."""
    p = Path(path)
    label = _label(what, path)
    if p.is_dir():
        raise UserError(f"{label}: is a directory, expected a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{label}: the file is not writable")
    _writable_dir(p.parent if str(p.parent) else Path("."), label)
    return p


def output_dir(path, what: str | None = None) -> Path:
    """A directory that exists and is writable, or can be made. Nothing is created."""
    p = Path(path)
    label = _label(what, path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{label}: exists and is not a directory")
    _writable_dir(p, label)
    return p


# ---------------------------------------------------------------------------
# optional packages
# ---------------------------------------------------------------------------
def require(module: str, extra: str, needed_by: str) -> None:
    """Check, with the other checks before any work, that the package ``module`` of an
    opt-in path is installed; otherwise a ``UserError`` naming the extra that brings it:
    ``cli.require("ray", "ray", "--ray")``. Nothing is imported (give a top-level name:
    a dotted one imports its parent); the caller imports the module where it uses it."""
    import importlib.util
    from importlib import metadata

    try:
        if importlib.util.find_spec(module) is not None:
            return
    except ImportError:  # its parent package is missing
        pass
    try:
        metadata.distribution("avas-repro")
        how = f"pip install 'avas-repro[{extra}]'"
    except metadata.PackageNotFoundError:  # run from a clone set up with the requirements files
        how = f"pip install -e '.[{extra}]' in the clone"
    req = Path(__file__).resolve().parent.parent / f"requirements-{extra}.txt"
    also = f" (or pip install -r {req.name})" if req.is_file() else ""
    raise UserError(f"{needed_by} needs the optional package {module}, which is not installed: {how}{also}")
