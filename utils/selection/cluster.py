"""Ray for ``select_images.py --ray``: joining a cluster (a refused token: one line naming what to set) or
starting a local Ray; the catalogue read on the workers (a CSV by one task, a Parquet file by one task per
row group), counted, grouped into shards: shard k holds the items with ``crc32(item_id) % shards == k``."""

from __future__ import annotations

from utils.cli import RowError, UserError

import contextlib
import itertools
import json
import logging
import os
import pickle
import re
import socket
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .catalogue import COLUMNS, catalogue_rows, group_items, is_parquet

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
FAIL_ENV = "AVAS_SELECT_RAY_FAIL_DIR"  # tests: a file <dir>/<stage> makes that stage's worker die once
PASS_ENV = ("AVAS_ONNX_CACHE", FAIL_ENV, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
STORE_ENV = ("AWS_", "GOOGLE_", "AZURE_", "HADOOP_")  # a local Ray's workers reach the driver's storage
EXCLUDES = [".git/", ".venv/", "data/", "assets/", "runs/", "**/__pycache__/"]
EXCLUDES += ["*.pth", "*.ckpt", "*.npy", "*.npz", "*.onnx", "*.parquet"]
HOST_PORT = re.compile(r"[\w.\-]+:\d+|\[[0-9a-fA-F:]+\]:\d+")
TOKEN_HELP = (
    "the token is read from RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; "
    "`ray get-auth-token` on the head node prints the cluster's"
)
BLOCK_ROWS = 50_000  # rows per block read; the bad rows come with their block
FIELDS = ("line", *COLUMNS)


def runtime_env(address: str | None) -> dict:
    """Workers import this project: a local Ray's by PYTHONPATH (with storage credentials), a cluster's shipped."""
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV or (not address and k.startswith(STORE_ENV))}
    if address:
        return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return {"env_vars": env}


@contextlib.contextmanager
def _quiet_stderr():
    """Ray's C++ client logs each failed attempt to file descriptor 2: hidden here."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_token(address: str) -> None:
    """One request to the GCS at ``address`` (HOST:PORT) as the join makes it: a refused token is a ``UserError``."""
    from ray._raylet import AuthenticationTokenLoader, GcsClient
    from ray.exceptions import AuthenticationError

    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e})") from None
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "token" and not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise UserError(f"--ray {address}: RAY_AUTH_MODE=token but no token was found ({TOKEN_HELP})")
    try:
        with _quiet_stderr():
            GcsClient(address=address)  # asks for the cluster id: refused at once without the token
    except AuthenticationError:
        refused = "refused the token: set RAY_AUTH_TOKEN to its token"
        why = refused if mode == "token" else "requires a token: set RAY_AUTH_MODE=token"
        raise UserError(f"--ray {address}: the cluster {why} ({TOKEN_HELP})") from None
    except Exception as e:  # unreachable and the like: ray.init says it below
        log.debug("token check of %s: %s", address, e)


def connect_ray(address: str | None = None, **init_kw) -> bool:
    """Join ``address`` (or RAY_ADDRESS), else start a local Ray; True when this call started it (to shut down)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        # a Ray of this machine only: on the loopback address, not the machine's interface,
        # where a head on 127.0.0.1 does not listen (read when Ray is first imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if address and HOST_PORT.fullmatch(address):
        check_token(address)
    kw = dict(include_dashboard=False, log_to_driver=True) if not address else {}
    # "local": a new Ray in this process, never a `ray start` cluster Ray would find on the machine
    quiet = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR
    kw["logging_level"] = quiet  # Ray's start-up notices; our own lines say what happens
    try:
        ray.init(address=address or "local", runtime_env=runtime_env(address), **{**kw, **init_kw})
    except ConnectionError as e:
        raise UserError(f"--ray {address}: cannot join the Ray cluster ({e})") from None
    import ray.data  # sets up its own console logging on import

    logging.getLogger("ray").setLevel(max(quiet, logging.WARNING))
    for h in logging.getLogger("ray.data").handlers:  # its log file keeps everything
        if isinstance(h, logging.StreamHandler):
            h.setLevel(quiet)
    log.info("Ray %s: %s", "cluster " + address if address else "started locally", ray.cluster_resources())
    return True


def _read_parts(batch, path: str):
    """Blocks of the rows (FIELDS, ``error`` empty) and bad rows (``error`` set) of each part in ``batch``."""
    for groups, line in zip(batch["groups"].to_pylist(), batch["line"].to_pylist()):
        errors: list[RowError] = []
        rows = catalogue_rows(path, errors, groups, line)
        while (chunk := list(itertools.islice(rows, BLOCK_ROWS))) or errors:
            bad, errors[:] = errors[:], []
            cols = list(zip(*chunk)) or [()] * len(FIELDS)
            table = {f: list(c) + [e.line if f == "line" else "" for e in bad] for f, c in zip(FIELDS, cols)}
            yield pa.table({**table, "error": [""] * len(chunk) + [e.message for e in bad]})


def read_dataset(path: str):
    """The catalogue as a Ray dataset, read on the workers: one task per part (row groups, first line), a CSV
    whole, a Parquet file's row groups each (from its footer)."""
    import ray.data

    parts = [{"groups": None, "line": 2}]
    if is_parquet(path):
        meta = pq.ParquetFile(path).metadata
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        lines = enumerate(itertools.accumulate(rows, initial=2))
        parts = [{"groups": [g], "line": line} for g, line in lines if g < len(rows)]
    ds = ray.data.from_items(parts, override_num_blocks=len(parts))
    return ds.map_batches(_read_parts, fn_kwargs={"path": path}, batch_size=1, batch_format="pyarrow")


def _counts(t):
    ok = pc.equal(t["error"], "")
    good, bad = t.filter(ok), t.filter(pc.invert(ok))
    errors = json.dumps(list(zip(bad["line"].to_pylist(), bad["error"].to_pylist())))
    return pa.table({"rows": [good.num_rows], "items": [len(pc.unique(good["item_id"]))], "errors": [errors]})


def count_catalogue(path: str) -> tuple[int, int, list[RowError]]:
    """``(usable rows, items, bad rows in line order)``; items are counted per block (they only size the shards)."""
    blocks = read_dataset(path).map_batches(_counts, batch_format="pyarrow", batch_size=None).take_all()
    errors = [RowError(path, line, message) for b in blocks for line, message in json.loads(b["errors"])]
    return sum(b["rows"] for b in blocks), sum(b["items"] for b in blocks), sorted(errors, key=lambda e: e.line)


def _keyed(t, n: int, done: list[int]):
    t = t.filter(pc.equal(t["error"], ""))
    shard = pa.array([zlib.crc32(i.encode("utf-8")) % n for i in t["item_id"].to_pylist()], pa.int64())
    return t.append_column("shard", shard).filter(pc.invert(pc.is_in(shard, pa.array(done, pa.int64()))))


def _shard(t, path: str):
    """One shard's rows -> its items (the local grouping rule), one row of payload ``{"items": items}``."""
    t = t.sort_by("line")
    items = group_items(zip(*(t[f].to_pylist() for f in FIELDS)), path)
    return pa.Table.from_pylist([shard_row(t["shard"][0].as_py(), {"items": items})])


def shard_dataset(path: str, n: int, done: set[int], partitions: int):
    """Rows ``shard_row(k, items)``, one per shard not in ``done``."""
    kw = dict(fn_kwargs={"n": n, "done": sorted(done)}, batch_format="pyarrow", batch_size=None)
    groups = read_dataset(path).map_batches(_keyed, **kw).groupby("shard", num_partitions=partitions)
    return groups.map_groups(_shard, fn_kwargs={"path": path}, batch_format="pyarrow")


def shard_row(k: int, payload) -> dict:
    """The row of shard ``k`` every stage takes and returns: its ``payload`` pickled."""
    return {"shard": int(k), "payload": pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)}
