"""Embedding cache: image vectors stored on disk so a rerun encodes only new images.

One SQLite file (``<cache_dir>/embeddings.sqlite``) holds two tables:

* ``files``: ``path -> (size, mtime_ns, sha256)``, so an unchanged file is recognised by
  ``stat`` alone and its content is hashed only once;
* ``vectors``: ``(namespace, sha256) -> (float32 vector, ok flag)``.

The key of a vector is the file CONTENT (sha256), so a renamed or copied image still
hits, plus a namespace made of the model's identity (``RecallModel.identity()``: the
model kind and the hash of the weights its image vectors depend on,
``utils.hashing.model_hash``), the preprocessing mode and the precision.
Anything that changes the vector changes the key; the device does not enter it (CPU
and CUDA fp32 agree to ~1e-6).

Robustness: every write is an SQLite transaction (atomic; a killed run loses at most
the batch in flight); a file that is not a readable cache is moved aside to
``*.corrupt-<time>`` with a warning and a fresh cache is started; any later SQLite
error disables the cache for the rest of the run with a warning, never the run.
Several processes may share one cache (SQLite locking, 60 s busy timeout).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from utils.hashing import sha256_file

log = logging.getLogger(__name__)

DB_NAME = "embeddings.sqlite"
SCHEMA_VERSION = 1
_CHUNK = 500  # SQLite's host-parameter limit is at least 999


class EmbeddingCache:
    """``EmbeddingCache(cache_dir, model_tag)``; ``model_tag`` identifies the weights:
    ``RecallModel.identity()`` (models/factory.py), e.g. ``"align:<model_hash>"``.

    Counters ``hits`` / ``misses`` / ``stored`` / ``hashed`` (files whose content had
    to be read) are kept per instance for logs and tests.
    """

    def __init__(self, cache_dir: str | os.PathLike, model_tag: str):
        self.dir = Path(cache_dir)
        self.path = self.dir / DB_NAME
        self.model_tag = model_tag
        self.hits = self.misses = self.stored = self.hashed = 0
        self.db: sqlite3.Connection | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            self._move_aside(e)
            try:
                self.db = self._open()
            except sqlite3.DatabaseError as e2:
                log.warning("embedding cache %s unusable (%s); running without a cache", self.path, e2)
                self.db = None

    # -- setup ---------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=60)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha TEXT)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (ns TEXT, sha TEXT, ok INTEGER, vec BLOB, PRIMARY KEY (ns, sha))"
            )
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            db.commit()
            (v,) = db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            if v != str(SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {v}, expected {SCHEMA_VERSION}")
            db.execute("SELECT count(*) FROM vectors").fetchone()
        except Exception:
            db.close()
            raise
        return db

    def _move_aside(self, err: Exception) -> None:
        bad = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning(
            "embedding cache %s is not a readable cache (%s); moved to %s and starting a new one",
            self.path,
            err,
            bad.name,
        )
        for suffix in ("", "-journal", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.replace(p, Path(str(bad) + suffix))

    def _disable(self, err: Exception) -> None:
        log.warning("embedding cache %s failed (%s: %s); continuing without it", self.path, type(err).__name__, err)
        try:
            self.db.close()
        except Exception:
            pass
        self.db = None

    @property
    def enabled(self) -> bool:
        return self.db is not None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def namespace(self, mode: str, precision: str) -> str:
        return f"{self.model_tag}|{mode}|{precision}"

    # -- keys ----------------------------------------------------------------
    def content_keys(self, paths: Sequence[str | os.PathLike]) -> list[str | None]:
        """sha256 of each file's content (None when the file cannot be read), taken
        from the ``files`` table when size and mtime are unchanged."""
        real = []
        stats = []
        for p in paths:
            try:
                st = os.stat(p)
                real.append(os.path.realpath(p))
                stats.append((st.st_size, st.st_mtime_ns))
            except OSError:
                real.append(None)
                stats.append(None)
        known: dict[str, tuple] = {}
        if self.db is not None:
            try:
                todo = [r for r in real if r is not None]
                for a in range(0, len(todo), _CHUNK):
                    part = todo[a : a + _CHUNK]
                    q = f"SELECT path, size, mtime_ns, sha FROM files WHERE path IN ({','.join('?' * len(part))})"
                    for path, size, mtime, sha in self.db.execute(q, part):
                        known[path] = (size, mtime, sha)
            except sqlite3.Error as e:
                self._disable(e)
        keys: list[str | None] = []
        new_rows = []
        for r, st in zip(real, stats):
            if r is None:
                keys.append(None)
                continue
            k = known.get(r)
            if k is not None and (k[0], k[1]) == st:
                keys.append(k[2])
                continue
            try:
                sha = sha256_file(r)
            except OSError:
                keys.append(None)
                continue
            self.hashed += 1
            keys.append(sha)
            new_rows.append((r, st[0], st[1], sha))
        if new_rows and self.db is not None:
            try:
                with self.db:
                    self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", new_rows)
            except sqlite3.Error as e:
                self._disable(e)
        return keys

    # -- vectors -------------------------------------------------------------
    def get_many(
        self, keys: Sequence[str | None], ns: str, dim: int | None = None
    ) -> dict[str, tuple[np.ndarray, bool]]:
        """``{sha: (vector float32, ok)}`` for the keys present (None keys skipped).
        A stored vector of the wrong size (``dim``) is treated as absent."""
        out: dict[str, tuple[np.ndarray, bool]] = {}
        want = list(dict.fromkeys(k for k in keys if k is not None))
        if self.db is None or not want:
            self.misses += len(want)
            return out
        try:
            for a in range(0, len(want), _CHUNK):
                part = want[a : a + _CHUNK]
                q = f"SELECT sha, ok, vec FROM vectors WHERE ns = ? AND sha IN ({','.join('?' * len(part))})"
                for sha, ok, blob in self.db.execute(q, [ns, *part]):
                    vec = np.frombuffer(blob, dtype=np.float32)
                    if dim is not None and vec.size != dim:
                        continue
                    out[sha] = (vec, bool(ok))
        except sqlite3.Error as e:
            self._disable(e)
            out = {}
        self.hits += len(out)
        self.misses += len(want) - len(out)
        return out

    def put_many(self, items: Sequence[tuple[str, np.ndarray, bool]], ns: str) -> None:
        """Store ``(sha, vector, ok)`` items in one transaction."""
        rows = [
            (ns, sha, int(ok), np.ascontiguousarray(vec, dtype=np.float32).tobytes())
            for sha, vec, ok in items
            if sha is not None
        ]
        if self.db is None or not rows:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)", rows)
            self.stored += len(rows)
        except sqlite3.Error as e:
            self._disable(e)
