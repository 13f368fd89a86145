"""Files appear whole or not at all (``atomic_path``, ``commit_outputs``, ``PartFile`` for
downloads), one run per destination (``exclusive_lock``), and the one UTF-8 reader
(``text_lines``: bad bytes reported at their line)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .cli import DataError, RowError, UserError, record_bad_row


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path beside ``path`` (``<path>.tmp<pid>``), renamed onto it when the block ends
    without an error, else removed."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """``open(path, mode)`` through :func:`atomic_path` (text: UTF-8, newlines untranslated for csv)."""
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    with atomic_path(path) as tmp, open(tmp, mode, **text) as f:
        yield f


def commit_outputs(outputs: dict, flags: dict | None = None) -> None:
    """A run's outputs committed together or not at all: ``{path: text, or write(tmp_path)}`` (None
    skipped), each through an :func:`atomic_path`, all renamed once every one is written; after an
    error, a failed rename too, the temporary paths not yet renamed are removed. An OSError is one
    ``UserError`` naming the output (and its flag from ``flags``)."""
    current = None
    try:
        with contextlib.ExitStack() as stack:
            for current in (p for p in outputs if p is not None):
                tmp = stack.enter_context(atomic_path(current))
                if isinstance(outputs[current], str):
                    tmp.write_text(outputs[current], encoding="utf-8", newline="")
                else:
                    outputs[current](tmp)
    except OSError as e:
        label = f"{flags[current]} {current}" if flags and current in flags else current
        raise UserError(f"{label}: cannot be written ({e.strerror or e}); the previous outputs are kept") from None


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """JSON (UTF-8, non-ASCII kept, NaN refused) written atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, allow_nan=False)
        f.write("\n")


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, name: str = ".lock"):
    """Hold ``directory/name`` (``flock``: released even when killed); a second run gets a ``UserError``."""
    import fcntl

    path = Path(directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # never through a symbolic link: our pid would land in its target
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "is a symbolic link" if path.is_symlink() else (e.strerror or str(e))
        raise UserError(f"lock file {path}: {why}; refusing to use it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            pid = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        finally:
            os.close(fd)
        raise UserError(f"another run holds {path} (pid {pid}); wait for it or use another destination") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def text_lines(path: str | os.PathLike, errors: list | None = None) -> Iterator[str]:
    """The lines of a UTF-8 file (BOM dropped, ends kept). A line that is not UTF-8 is a
    ``DataError``, or with ``errors=[]`` a ``RowError`` and an empty line (csv line numbers hold)."""
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                why = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                record_bad_row(errors, RowError(path, n, why))
                yield "\n"
                continue
            yield text.removeprefix("\ufeff") if n == 1 else text


def read_json(path: str | os.PathLike, what: str | None = None):
    """The JSON document in ``path``; anything wrong is a ``DataError`` naming file and line."""
    label = f"{what} {path}" if what else str(path)
    if not os.path.isfile(path):
        raise DataError(f"{label}: no such file")
    try:
        return json.loads("".join(text_lines(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{label}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def write_error(e: OSError, path: str | os.PathLike) -> UserError:
    """One line for a failed write: a full disk (with the space left), a file-size limit, or else."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 1e6:.1f} MB"
        except OSError:
            free = "unknown"
        return UserError(f"disk full while writing {path} ({e.strerror}); {free} free on that disk")
    if e.errno == errno.EFBIG:
        return UserError(f"file-size limit reached while writing {path} ({e.strerror})")
    return UserError(f"cannot write {path} ({e.strerror or e})")


class PartFile:
    """A download's bytes in ``part`` (appended to when ``resume``), never through a symbolic link;
    ``commit(path)`` fsyncs and renames it. A failed write is a ``write_error``; the part stays."""

    def __init__(self, part: str | os.PathLike, resume: bool = False):
        self.path = Path(part)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if resume else os.O_TRUNC)
        try:
            self.file = os.fdopen(os.open(self.path, flags, 0o644), "ab" if resume else "wb")
        except OSError as e:
            raise write_error(e, self.path) from None
        self.size = self.file.seek(0, os.SEEK_END)

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            self.discard(keep=True)
            raise write_error(e, self.path) from None
        self.size += len(data)

    def close(self) -> None:
        """Flush and fsync (a rename after a crash must not expose an empty file)."""
        if self.file.closed:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            self.discard(keep=True)
            raise write_error(e, self.path) from None
        self.file.close()

    def commit(self, path: str | os.PathLike) -> Path:
        self.close()
        return self.path.replace(path)

    def discard(self, keep: bool = False) -> None:
        """Close without flushing what is buffered; remove the part unless ``keep``."""
        with contextlib.suppress(OSError):
            self.file.close()
        if not keep:
            self.path.unlink(missing_ok=True)
