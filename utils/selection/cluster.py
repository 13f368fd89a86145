"""The catalogue on a Ray cluster, never in the driver: read on the workers with the
local reader (same lines, same bad rows; a CSV by one task, since a row's line is known
only from the file's start; a Parquet file by one task per row group), counted, then
grouped into shards: shard k holds the items with ``crc32(item_id) % shards == k``, so the
same catalogue always makes the same shards."""

from __future__ import annotations

from utils.cli import RowError

import functools
import itertools
import json
import pickle
import zlib

import numpy as np

from .catalogue import catalogue_rows, group_items, is_parquet

BLOCK_ROWS = 50_000  # rows per block read; the bad rows come with their block
FIELDS = ("line", "item_id", "title", "poi_names", "image")


def _parts(path: str) -> list[tuple[list[int] | None, int]]:
    """``(row groups, first line)`` per read task (a Parquet file's from its footer)."""
    if not is_parquet(path):
        return [(None, 2)]
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return [([g], line) for g, line in enumerate(itertools.accumulate(rows, initial=2)) if g < len(rows)]


def _read(path: str, groups, line: int):
    """Blocks of the rows (FIELDS, ``error`` empty) and bad rows (``error`` set) of a part."""
    import pyarrow as pa

    errors: list[RowError] = []
    rows = catalogue_rows(path, errors, groups, line)
    while True:
        chunk = list(itertools.islice(rows, BLOCK_ROWS))
        bad, errors[:] = errors[:], []
        if not chunk and not bad:
            return
        cols = list(zip(*chunk)) or [()] * len(FIELDS)
        table = {f: list(c) + [e.line if f == "line" else "" for e in bad] for f, c in zip(FIELDS, cols)}
        yield pa.table({**table, "error": [""] * len(chunk) + [e.message for e in bad]})


def read_dataset(path: str):
    """The catalogue as a Ray dataset, read on the workers."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Catalogue(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, **kw):
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[path])
            return [ReadTask(functools.partial(_read, path, g, line), meta) for g, line in _parts(path)]

    return ray.data.read_datasource(Catalogue())


def _counts(t):
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.equal(t["error"], "")
    good, bad = t.filter(ok), t.filter(pc.invert(ok))
    errors = json.dumps(list(zip(bad["line"].to_pylist(), bad["error"].to_pylist())))
    return pa.table({"rows": [good.num_rows], "items": [len(pc.unique(good["item_id"]))], "errors": [errors]})


def count_catalogue(path: str) -> tuple[int, int, list[RowError]]:
    """``(usable rows, items, bad rows in line order)``, before any scoring. Items are
    counted per block (more when an item's rows are far apart): they only size the shards."""
    ds = read_dataset(path).map_batches(_counts, batch_format="pyarrow", batch_size=None)
    rows = items = 0
    errors: list[RowError] = []
    for r in ds.iter_rows():
        rows, items = rows + r["rows"], items + r["items"]
        errors += [RowError(path, line, message) for line, message in json.loads(r["errors"])]
    return rows, items, sorted(errors, key=lambda e: e.line)


def shard_of(item_ids, n: int) -> np.ndarray:
    return np.array([zlib.crc32(i.encode("utf-8")) % n for i in item_ids], dtype=np.int64)


def _keyed(t, n: int, done: list[int]):
    import pyarrow as pa
    import pyarrow.compute as pc

    t = t.filter(pc.equal(t["error"], ""))
    shard = shard_of(t["item_id"].to_pylist(), n)
    keep = ~np.isin(shard, done)
    return t.append_column("shard", pa.array(shard)).filter(pa.array(keep))


def _shard(t, path: str):
    """One shard's rows -> its items (the local grouping rule), one payload row."""
    t = t.sort_by("line")
    items = group_items(zip(*(t[f].to_pylist() for f in FIELDS)), path)
    return pack([(int(t["shard"][0].as_py()), items)])


def shard_dataset(path: str, n: int, done: set[int], partitions: int):
    """Rows ``{"shard": k, "payload": pickled items}``, one per shard not in ``done``."""
    ds = read_dataset(path).map_batches(
        _keyed, fn_kwargs={"n": n, "done": sorted(done)}, batch_format="pyarrow", batch_size=None
    )
    return ds.groupby("shard", num_partitions=partitions).map_groups(
        _shard, fn_kwargs={"path": path}, batch_format="pyarrow"
    )


# --- the payload rows every stage takes and returns ---------------------------------------
def unpack(batch):
    return ((k, pickle.loads(p)) for k, p in zip(batch["shard"].tolist(), batch["payload"]))


def pack(rows: list[tuple[int, object]]) -> dict:
    payload = np.empty(len(rows), dtype=object)
    payload[:] = [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for _, p in rows]
    return {"shard": np.array([k for k, _ in rows], dtype=np.int64), "payload": payload}
