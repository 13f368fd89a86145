"""The shard files of a Ray selection: ``part-NNNNNN.parquet``, each holding the output
rows of ``shard_items`` whole items and, in its metadata, the plan it was made under
(what its rows depend on: catalogue content, weights, settings), its download counts and
its scoring counts. A rerun keeps the shards of its own plan and removes the others."""

from __future__ import annotations

from utils.cli import UserError

import hashlib
import json
import logging
import re
from pathlib import Path

from utils.hashing import sha256_file
from utils.io import atomic_path

from .catalogue import OUTPUT_HEADER, Item, output_rows
from .run import Selection, add_counts

log = logging.getLogger(__name__)

PLAN_FILE = "_plan.json"
META_KEY = b"avas_select"
POI_TABLES = ("poi_pic_num", "poi_image_vectors", "poi_name_vectors")
SHARD_NAME = re.compile(r"part-(\d{6})\.parquet")
SHARD_TEMP = re.compile(r"part-\d{6}\.parquet\.tmp\d+")
COLUMN_TYPES = "string int64 string string float64 int64 float64 int64 int8 string string".split()  # OUTPUT_HEADER


def plan_key(job: Selection, hashes: dict, n_shards: int, shard_items: int) -> str:
    """What the output rows depend on: a finished shard is reused only under the same key."""
    paths = {"items": job.items, **{n: getattr(job.files, n) for n in POI_TABLES}}
    enc = job.scoring.enc
    plan = {
        "files": {n: sha256_file(p) if p else None for n, p in paths.items()},
        "hashes": hashes,
        "shards": n_shards,
        "shard_items": shard_items,
        "recall_k": job.scoring.recall_k,
        "recall_only": job.files.recall_only,
        "preprocess": enc.preprocess,
        "precision": enc.precision,
        "image_cache": job.image_dir,
        "items_path": job.items,
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def shard_file(d: Path, k: int) -> Path:
    return d / f"part-{k:06d}.parquet"


def finished_shards(d: Path, key: str, n: int) -> set[int]:
    """Shards of this plan already written (complete: they are written atomically).
    Shards of another plan and temporary files of an interrupted write are removed; any
    other file is the user's, and the run is refused rather than touch it."""
    import pyarrow.parquet as pq

    done, stale = set(), []
    for p in sorted(d.iterdir()):
        if p.name in (PLAN_FILE, ".lock"):
            continue
        if SHARD_TEMP.fullmatch(p.name):
            p.unlink()
            continue
        try:
            meta = json.loads(pq.read_schema(p).metadata[META_KEY]) if SHARD_NAME.fullmatch(p.name) else None
        except Exception:  # not a Parquet file, or not one of ours
            meta = None
        if meta is None:
            raise UserError(
                f"--out {d}: holds {p.name}, not a shard of select_images.py; give a new or empty directory"
            )
        k = int(SHARD_NAME.fullmatch(p.name).group(1))
        if meta.get("plan") == key and k < n:
            done.add(k)
        else:
            stale.append(p)
    if stale:
        log.warning("%s: %d shards of another run (catalogue, weights or settings differ) are removed", d, len(stale))
        for p in stale:
            p.unlink()
    return done


def write_plan(d: Path, key: str) -> None:
    with atomic_path(d / PLAN_FILE) as tmp:
        tmp.write_text(json.dumps({"key": key}), encoding="utf-8")


def output_table(items: list[Item], meta: dict):
    """A shard's rows as an Arrow table: the columns of the CSV, typed."""
    import pyarrow as pa

    types = [getattr(pa, t)() for t in COLUMN_TYPES]
    cols = list(zip(*output_rows(items))) or [[] for _ in OUTPUT_HEADER]
    schema = pa.schema(
        list(zip(OUTPUT_HEADER, types)), metadata={META_KEY: json.dumps(meta, ensure_ascii=False).encode()}
    )
    return pa.Table.from_arrays([pa.array(list(c), type=t) for c, t in zip(cols, types)], schema=schema)


def write_shard(d: Path, k: int, items: list[Item], meta: dict) -> None:
    """Shard ``k`` written atomically (a retried task rewrites the same file)."""
    import pyarrow.parquet as pq

    with atomic_path(shard_file(d, k)) as tmp:
        pq.write_table(output_table(items, meta), tmp)


def merge_shards(cat, shard_dir: Path, n: int) -> tuple[dict, dict]:
    """The driver's candidates filled from the shard files; returns the fetch counts and
    the scoring counts, added up."""
    import pyarrow.parquet as pq

    by_line = {c.line: c for c in cat.cands}
    fetch: dict = {}
    counts: dict = {}
    for k in range(n):
        t = pq.read_table(shard_file(shard_dir, k))
        for row in t.to_pylist():
            c = by_line[row["line"]]
            for name in OUTPUT_HEADER[3:8] + ("detail",):
                setattr(c, name, row[name])
            c.file, c.selected = row["file"] or None, bool(row["selected"])
        meta = json.loads(t.schema.metadata[META_KEY])
        add_counts(fetch, meta["fetch"])
        add_counts(counts, meta["counts"])
    return fetch, counts
