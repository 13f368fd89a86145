"""The shard files of a Ray selection, ``part-NNNNNN.parquet``: the output rows of its items and, in the
metadata, the plan it was made under, its counts and where its stages ran (a rerun keeps the shards of its
own plan only). They, the summary and downloaded images live on a path every node sees, or a URI pyarrow
understands (``file://``, ``s3://``, ``gs://``, ``hdfs://``; credentials as pyarrow finds them)."""

from __future__ import annotations

from utils.cli import UserError

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from utils.formats import IMAGE_EXTS
from utils.hashing import sha256_file

from .catalogue import OUTPUT_HEADER, Candidate, Item, group_items, output_rows, url_stem

log = logging.getLogger(__name__)

PLAN_FILE = "_plan.json"  # written by older versions beside the shards: left alone
META_KEY = b"avas_select"
POI_TABLES = ("poi_pic_num", "poi_image_vectors", "poi_name_vectors")
SHARD_FILE = "part-{:06d}.parquet"  # of shard k; SHARD_NAME reads k back
SHARD_NAME = re.compile(r"part-(\d{6,})\.parquet")
SHARD_TEMP = re.compile(r"(part-\d{6,}\.parquet|_plan\.json)\.tmp\d+")
COLUMN_TYPES = "string int64 string string float64 int64 float64 int64 int8 string string".split()  # OUTPUT_HEADER


def is_uri(location) -> bool:
    return "://" in str(location)


def open_dir(location: str):
    """``(pyarrow filesystem, path on it)`` of a URI or a local path."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(location if is_uri(location) else os.path.abspath(location))


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def put(fs, path: str, write) -> None:
    """``write(local_tmp)`` makes the file, copied beside ``path`` then moved: readers never see half a file."""
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory() as d:
        tmp = os.path.join(d, os.path.basename(path))
        write(tmp)
        part = f"{path}.tmp{os.getpid()}"
        fs.create_dir(os.path.dirname(path), recursive=True)
        pafs.copy_files(tmp, part, destination_filesystem=fs)  # the source: a local path
        fs.move(part, path)


@contextlib.contextmanager
def staged_cache(location: str, cands: list[Candidate]):
    """A local stand-in for the image cache at URI ``location``: cached copies pulled in, new ones pushed after."""
    import pyarrow.fs as pafs

    fs, base = open_dir(location)
    with tempfile.TemporaryDirectory() as stage:
        names = [url_stem(c.image) + ext for c in cands for ext in IMAGE_EXTS]
        had = {os.path.basename(i.path) for i in fs.get_file_info([join(base, n) for n in names]) if i.size}
        for name in had:
            pafs.copy_files(join(base, name), os.path.join(stage, name), source_filesystem=fs)
        yield stage
        for name in {Path(c.file).name for c in cands if c.file} - had:
            put(fs, join(base, name), lambda tmp, n=name: os.replace(os.path.join(stage, n), tmp))
        for c in cands:
            c.file = join(location, Path(c.file).name) if c.file else None


def plan_key(job, hashes: dict, n_shards: int, shard_items: int) -> str:
    """What the output rows of a ``Selection`` depend on: a finished shard is reused only under the same key."""
    paths = {"items": job.items, **{n: getattr(job.files, n) for n in POI_TABLES}}
    plan = {
        "files": {n: sha256_file(p) if p else None for n, p in paths.items()},
        "hashes": hashes,
        "shards": n_shards,
        "layout": "items by crc32(item_id) % shards",
        "shard_items": shard_items,
        "recall_k": job.scoring.recall_k,
        "recall_only": job.files.recall_only,
        "preprocess": job.scoring.enc.preprocess,
        "precision": job.scoring.enc.precision,
        "image_cache": job.image_dir,
        "items_path": job.items,
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def finished_shards(fs, d: str, key: str | None, n: int) -> dict[int, dict]:
    """``{k: metadata}`` (from the footers) of the shards of this plan already written; other plans' shards and
    temp files removed; another file: refused."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    done, stale = {}, []
    infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
    for name in sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File):
        path = f"{d}/{name}"
        if name in (PLAN_FILE, ".lock"):
            continue
        if SHARD_TEMP.fullmatch(name):
            fs.delete_file(path)
            continue
        shard = SHARD_NAME.fullmatch(name)
        try:
            meta = json.loads(pq.read_schema(path, filesystem=fs).metadata[META_KEY]) if shard else None
        except Exception:  # not a Parquet file, or not one of ours
            meta = None
        if meta is None:
            raise UserError(f"--out {d}: holds {name}, not a shard of select_images.py; give a new or empty directory")
        if meta.get("plan") == key and int(shard.group(1)) < n:
            done[int(shard.group(1))] = meta
        else:
            stale.append(path)
    if stale and key is not None:  # None: only looking for files not ours
        log.warning("%s: %d shards of another run (catalogue, weights or settings differ) are removed", d, len(stale))
        for path in stale:
            fs.delete_file(path)
    return done


def write_shard(location: str, k: int, items: list[Item], meta: dict) -> None:
    """Shard ``k``, columns typed, written atomically; its metadata also holds the items' titles (for the page)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {**meta, "titles": {it.item_id: [it.title, it.poi_names] for it in items}}
    columns = [(name, getattr(pa, t)()) for name, t in zip(OUTPUT_HEADER, COLUMN_TYPES)]
    schema = pa.schema(columns, metadata={META_KEY: json.dumps(meta, ensure_ascii=False)})
    table = pa.Table.from_pylist([dict(zip(OUTPUT_HEADER, row)) for row in output_rows(items)], schema=schema)
    fs, d = open_dir(location)
    put(fs, f"{d}/{SHARD_FILE.format(k)}", lambda tmp: pq.write_table(table, tmp))


def shard_items(fs, d: str, ks):
    """The items of the shards ``ks``, rebuilt from their rows."""
    import pyarrow.parquet as pq

    for k in sorted(ks):
        t = pq.read_table(f"{d}/{SHARD_FILE.format(k)}", filesystem=fs)
        titles, rows = json.loads(t.schema.metadata[META_KEY])["titles"], t.to_pylist()
        items = group_items(
            [(r["line"], r["item_id"], *titles.get(r["item_id"], ["", ""]), r["image"]) for r in rows], d
        )
        cands = {c.line: c for it in items for c in it.cands}  # a catalogue line is one candidate
        for row in rows:
            c = cands[row["line"]]
            for name in OUTPUT_HEADER[3:8] + ("detail",):
                setattr(c, name, row[name])
            c.file, c.selected = row["file"] or None, bool(row["selected"])
        yield from items
