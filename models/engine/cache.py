"""Embedding cache (``<cache_dir>/embeddings.sqlite``) keyed by file content (sha256, known by size and mtime)
and namespace (model identity, preprocessing, precision). A vector failing its CRC-32, size or finiteness is
encoded again, a file not a cache moved aside, a later SQLite error disables the cache, never the run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from utils.hashing import sha256_file

log = logging.getLogger(__name__)

DB_NAME = "embeddings.sqlite"
SCHEMA_VERSION = 1  # the crc column is an addition: older versions still read the file
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)",
    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime_ns INT, sha TEXT)",
    "CREATE TABLE IF NOT EXISTS vectors (ns TEXT, sha TEXT, ok INT, vec BLOB, crc INT, PRIMARY KEY (ns, sha))",
)


def _crc(blob: bytes, ok: bool) -> int:
    return zlib.crc32(blob + (b"\1" if ok else b"\0"))


class EmbeddingCache(contextlib.AbstractContextManager):
    """``model_tag``: ``RecallModel.identity()``; ``hits``, ``misses``, ``stored``, ``hashed``, ``rejected``: counts."""

    def __init__(self, cache_dir: str | os.PathLike, model_tag: str):
        self.path = Path(cache_dir) / DB_NAME
        self.model_tag = model_tag
        self.hits = self.misses = self.stored = self.hashed = self.rejected = 0
        self.db: sqlite3.Connection | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            self._move_aside(e)
            try:
                self.db = self._open()
            except sqlite3.DatabaseError as e2:
                log.warning("embedding cache %s unusable (%s); running without a cache", self.path, e2)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=60)
        try:
            with db:
                for statement in SCHEMA:
                    db.execute(statement)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                (v,) = db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
                if v != str(SCHEMA_VERSION):
                    raise sqlite3.DatabaseError(f"schema version {v}, expected {SCHEMA_VERSION}")
                if "crc" not in {row[1] for row in db.execute("PRAGMA table_info(vectors)")}:
                    with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                        db.execute("ALTER TABLE vectors ADD COLUMN crc INT")  # a cache of the first format
            db.execute("SELECT count(*) FROM vectors").fetchone()
        except Exception:
            db.close()
            raise
        return db

    def _move_aside(self, err: Exception) -> None:
        bad = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("embedding cache %s is not a readable cache (%s); moved to %s, starting anew", self.path, err, bad)
        for suffix in ("", "-journal", "-wal", "-shm"):
            if Path(str(self.path) + suffix).exists():
                os.replace(str(self.path) + suffix, str(bad) + suffix)

    def close(self) -> None:
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
            self.db = None

    def __exit__(self, *exc):
        log.info(
            "cache %s: %d hits, %d misses, %d stored, %d files hashed, %d rejected",
            *(self.path, self.hits, self.misses, self.stored, self.hashed, self.rejected),
        )
        self.close()

    def namespace(self, mode: str, precision: str) -> str:
        return f"{self.model_tag}|{mode}|{precision}"

    def _sql(self, query: str, params: list, many: bool = False) -> list | None:
        """The rows of ``query`` (``many``: once per row of ``params``); None once an error disabled the cache."""
        if self.db is None:
            return None
        try:
            with self.db:
                return (self.db.executemany if many else self.db.execute)(query, params).fetchall()
        except sqlite3.Error as e:
            log.warning("embedding cache %s failed (%s: %s); continuing without it", self.path, type(e).__name__, e)
            self.close()
            return None

    def content_keys(self, paths: Sequence[str | os.PathLike]) -> list[str | None]:
        """sha256 of each file's content (None when unreadable)."""
        stats = []
        for p in paths:
            try:
                st = os.stat(p)
                stats.append((os.path.realpath(p), st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append(None)
        q = "SELECT path, size, mtime_ns, sha FROM files WHERE path IN (SELECT value FROM json_each(?))"
        known = {row[0]: row[1:] for row in self._sql(q, [json.dumps([st[0] for st in stats if st])]) or []}
        keys, new_rows = [], []
        for st in stats:
            k = known.get(st[0]) if st else None
            sha = k[2] if k and k[:2] == st[1:] else None
            if st and sha is None:
                with contextlib.suppress(OSError):  # unreadable: no key
                    sha = sha256_file(st[0])
                    self.hashed += 1
                    new_rows.append((*st, sha))
            keys.append(sha)
        self._sql("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", new_rows, many=True)
        return keys

    def get_many(self, keys: Sequence[str | None], ns: str, dim: int | None = None) -> dict:
        """``{sha: (float32 vector, ok)}`` of the keys present and sound."""
        want = list(dict.fromkeys(k for k in keys if k is not None))
        out, rejected, unverified = {}, 0, 0
        q = "SELECT sha, ok, vec, crc FROM vectors WHERE ns = ? AND sha IN (SELECT value FROM json_each(?))"
        for sha, ok, blob, crc in self._sql(q, [ns, json.dumps(want)]) or []:
            vec = np.frombuffer(blob, dtype=np.float32)
            unverified += crc is None
            damaged = crc is not None and crc != _crc(blob, bool(ok))
            if damaged or (dim is not None and vec.size != dim) or not np.isfinite(vec).all():
                rejected += 1
            else:
                out[sha] = (vec, bool(ok))
        if rejected:
            log.warning("%s: %d vectors failed their checksum or are not finite: encoded again", self.path, rejected)
        if unverified:
            log.info("embedding cache %s: %d vectors of the first format, without a checksum", self.path, unverified)
        self.rejected += rejected
        self.hits += len(out)
        self.misses += len(want) - len(out)
        return out

    def put_many(self, items: Sequence[tuple[str, np.ndarray, bool]], ns: str) -> None:
        """Store ``(sha, vector, ok)`` items in one transaction (non-finite vectors never)."""
        rows = []
        for sha, vec, ok in items:
            blob = np.ascontiguousarray(vec, dtype=np.float32).tobytes()
            if sha is not None and np.isfinite(vec).all():
                rows.append((ns, sha, int(ok), blob, _crc(blob, bool(ok))))
        query = "INSERT OR REPLACE INTO vectors (ns, sha, ok, vec, crc) VALUES (?, ?, ?, ?, ?)"
        if self._sql(query, rows, many=True) is not None:
            self.stored += len(rows)
