"""``select_images.py --ray``: the two-stage selector on Ray Data, with the same results
as the local run (same rows, same order, scores within 1e-5, same selections).

    python select_images.py --ray ...                 # a local Ray, started in-process
    python select_images.py --ray HOST:6379 ...       # join a cluster (or set RAY_ADDRESS)

The unit of work is a *shard*: ``--shard-items`` consecutive items of the catalogue (all
candidates of an item are in one shard), one row of the Ray dataset. Stages:

1. ``fetch`` (CPU task): resolve local paths, download URLs into ``--image-cache`` with the
   downloader's verified fetch (utils.download), mark duplicates -- as the local path.
2. ``decode`` (CPU task, fused with ``fetch`` by Ray Data, so on the same node): every
   distinct readable file decoded and resized to 224 x 224 (uint8; the reference
   preprocessing up to the normalisation); files that do not decode become ``unreadable``.
3. ``select`` (actor pool, ``--actors`` actors, one model set each, ``--cpus-per-actor``,
   ``--gpus-per-actor``): normalisation, image and text encoding on the engine of
   ``--backend``, recall scores and ranks, the top ``--recall-k``, the ranker head
   (SiameseRanker.score_many), final ranks -- ``select_images.select_block``, the very
   function the local path runs on the whole catalogue.
4. ``write`` (CPU task): the shard's rows as ``<shards>/part-NNNNNN.parquet``, written
   atomically, named by shard number.

The steps themselves are select_images.py's (``steps``, passed in by its ``main``: this
module is the executor, it does not import the script). The driver reads the catalogue (bad rows reported as locally), checks the models and POI
tables once before any Ray work, and at the end merges the shards into ``--out`` (one CSV,
the local path's writer) or keeps them as the output (``--out`` without ``.csv``: a
directory of Parquet shards), then writes ``--html`` and the summary as the local path does.

Failures: a candidate that cannot be fetched or decoded is a status in its row. A task
whose worker dies is retried (``max_retries``); an actor that dies is restarted
(``max_restarts``) and its batch retried (``max_task_retries``). A retried shard rewrites
the same file, so nothing is written twice. A rerun with the same ``--out`` skips the
shards already written when the plan (catalogue content, weights, settings) is the same;
with a different plan the old shards are removed first (logged).

On a cluster every node must see the same paths (catalogue, images, checkpoints, tables,
``--out``, ``--image-cache``): a shared filesystem. The project's code is shipped to the
workers by Ray (``runtime_env`` ``working_dir``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from utils.hashing import sha256_file
from utils.io import atomic_path, exclusive_lock
from utils.selection import (
    OK,
    OUTPUT_HEADER,
    UNREADABLE,
    Item,
    mark_duplicates,
    output_rows,
    resolve_images,
    write_output,
)

log = logging.getLogger("select_ray")

ROOT = Path(__file__).resolve().parent
PLAN_FILE = "_plan.json"
META_KEY = b"avas_select"
TASK_RETRIES = 3  # a CPU task whose worker dies is run again up to this often
ACTOR_RESTARTS = 3  # an encoding actor that dies is restarted up to this often
FAIL_ENV = "AVAS_SELECT_RAY_FAIL_DIR"  # tests: a file <dir>/<stage> makes that stage's worker die once
PASS_ENV = ("AVAS_ONNX_CACHE", FAIL_ENV, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
EXCLUDES = [
    ".git/",
    ".venv/",
    "data/",
    "assets/",
    "runs/",
    "**/__pycache__/",
    "*.pth",
    "*.ckpt",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.parquet",
]


# ---------------------------------------------------------------------------
# Ray session
# ---------------------------------------------------------------------------
def runtime_env(address: str | None) -> dict:
    """Workers import this project: on a local Ray through PYTHONPATH, on a cluster by
    shipping the code (``working_dir``; data files left out)."""
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    if address:
        return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return {"env_vars": env}


def connect(address: str | None = None, **init_kw) -> bool:
    """Join ``address`` (or RAY_ADDRESS), else start a local Ray in this process.
    Returns True when this call started the session (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw = dict(include_dashboard=False, log_to_driver=True) if not address else {}
    kw.update(init_kw)
    try:
        ray.init(address=address, runtime_env=runtime_env(address), **kw)
    except ConnectionError as e:
        from utils.cli import UserError

        raise UserError(f"--ray {address}: cannot join the Ray cluster ({e})") from None
    log.info("Ray %s: %s", "cluster " + address if address else "started locally", ray.cluster_resources())
    return True


def _maybe_die(stage: str) -> None:
    """Fault injection for the tests: when ``$AVAS_SELECT_RAY_FAIL_DIR/<stage>`` exists,
    the first worker to remove it dies as a crashed process would."""
    d = os.environ.get(FAIL_ENV)
    if not d:
        return
    try:
        os.remove(os.path.join(d, stage))
    except FileNotFoundError:
        return
    print(f"select_ray: injected failure in {stage}", file=sys.stderr, flush=True)
    os._exit(1)


# ---------------------------------------------------------------------------
# the plan: shards and what a finished shard must agree with
# ---------------------------------------------------------------------------
def plan_shards(items: list[Item], shard_items: int) -> list[list[Item]]:
    return [items[a : a + shard_items] for a in range(0, len(items), shard_items)]


def plan_key(args, hashes: dict, n_shards: int, image_cache: str) -> str:
    """What the output rows depend on: a finished shard is reused only under the same key."""
    files = {
        opt: sha256_file(getattr(args, opt)) if getattr(args, opt) else None
        for opt in ("items", "poi_pic_num", "poi_image_vectors", "poi_name_vectors")
    }
    plan = {
        "files": files,
        "hashes": hashes,
        "shards": n_shards,
        "shard_items": args.shard_items,
        "recall_k": args.recall_k,
        "recall_only": args.recall_only,
        "preprocess": args.preprocess,
        "precision": args.precision,
        "image_cache": image_cache,
        "items_path": args.items,
    }
    import hashlib

    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def shard_dir_of(args, out_is_csv: bool) -> Path:
    return Path(f"{args.out}.shards") if out_is_csv else Path(args.out)


def shard_file(d: Path, k: int) -> Path:
    return d / f"part-{k:06d}.parquet"


SHARD_NAME = re.compile(r"part-(\d{6})\.parquet")
SHARD_TEMP = re.compile(r"part-\d{6}\.parquet\.tmp\d+")


def shard_meta(p: Path) -> dict | None:
    """The metadata of one of our shard files, None for any other file."""
    import pyarrow.parquet as pq

    if not SHARD_NAME.fullmatch(p.name) or not p.is_file():
        return None
    try:
        return json.loads(pq.read_schema(p).metadata[META_KEY])
    except Exception:
        return None


def finished_shards(d: Path, key: str, n: int) -> set[int]:
    """Shards of this plan already written (complete: they are written atomically).
    Shards of another plan and temporary files of an interrupted write are removed; any
    other file is the user's, and the run is refused rather than touch it."""
    from utils.cli import UserError

    done, stale = set(), []
    for p in sorted(d.iterdir()):
        if p.name in (PLAN_FILE, ".lock"):
            continue
        if SHARD_TEMP.fullmatch(p.name):
            p.unlink()
            continue
        meta = shard_meta(p)
        if meta is None:
            raise UserError(
                f"--out {d}: holds {p.name}, which is not a shard of select_images.py; give a new or empty directory"
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


# ---------------------------------------------------------------------------
# stages (each takes and returns a batch of shard rows: {"shard": [...], "payload": [...]})
# ---------------------------------------------------------------------------
def _rows(batch):
    return zip(batch["shard"].tolist(), batch["payload"])


def _batch(rows: list[tuple[int, object]]) -> dict:
    payload = np.empty(len(rows), dtype=object)
    payload[:] = [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for _, p in rows]
    return {"shard": np.array([k for k, _ in rows], dtype=np.int64), "payload": payload}


def fetch_stage(batch, args, image_cache: str):
    """Stage 1: local paths and verified downloads, duplicates (utils.select)."""
    _maybe_die("fetch")
    out = []
    for k, raw in _rows(batch):
        items = pickle.loads(raw)
        fetch = resolve_images(
            items,
            os.path.dirname(args.items),
            image_cache,
            workers=args.download_workers,
            timeout=args.timeout,
            progress=False,
        )
        mark_duplicates(items)
        out.append((k, {"items": items, "fetch": fetch}))
    return _batch(out)


def decode_stage(batch, args):
    """Stage 2: every distinct readable file decoded and resized to the model's input
    size (uint8); the normalisation runs in the actor (utils.images.to_tensor)."""
    import cv2

    from utils.formats import SIZE, decode_rgb

    _maybe_die("decode")
    out = []
    for k, raw in _rows(batch):
        p = pickle.loads(raw)
        arrays = {}
        for it in p["items"]:
            for c in it.cands:
                if c.status != OK:
                    continue
                if c.file not in arrays:
                    try:
                        arrays[c.file] = cv2.resize(decode_rgb(c.file, args.preprocess), (SIZE, SIZE))
                    except Exception as e:  # any decode failure, as utils.images.load_image
                        log.warning("unreadable image %s (%s: %s)", c.file, type(e).__name__, e)
                        arrays[c.file] = None
                if arrays[c.file] is None:
                    c.status, c.detail = UNREADABLE, "does not decode as an image"
        p["images"] = {f: a for f, a in arrays.items() if a is not None}
        out.append((k, p))
    return _batch(out)


class DecodedImages:
    """``image_loader`` of the actor's RecallModels: the shard's decoded arrays by path."""

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def __call__(self, path, mode="reference"):
        from utils.formats import ZERO_TENSOR, to_tensor

        a = self.arrays.get(str(path))
        if a is None:
            return ZERO_TENSOR.clone(), False
        return to_tensor(a), True  # a is 224 x 224 already: the resize is a copy


class Select:
    """Stage 3 (actor): one model set per actor; ``select_block`` on each shard."""

    def __init__(self, args, load_models, load_tables, select_block, image_backend):
        from utils.cli import setup_logging

        import torch

        setup_logging(args.log_level)
        torch.set_num_threads(max(1, int(round(args.cpus_per_actor or 1))))
        self.args = copy.copy(args)
        self.args.workers = 0  # images are decoded already
        device = "cuda" if args.gpus_per_actor > 0 else "cpu"
        self.select_block, self.image_backend = select_block, image_backend
        self.models = load_models(self.args, device)
        self.tables = load_tables(self.args, self.models)

    def __call__(self, batch):
        _maybe_die("select")
        out = []
        for k, raw in _rows(batch):
            p = pickle.loads(raw)
            loader = DecodedImages(p.pop("images"))
            for rm in {id(m): m for m in (self.models.recall, self.models.rank_rm) if m}.values():
                rm.image_loader = loader
            counts = self.select_block(self.args, p["items"], self.models, self.tables)
            counts["backend"] = self.image_backend(self.args, self.models, counts)
            out.append((k, {"items": p["items"], "fetch": p["fetch"], "counts": counts}))
        return _batch(out)


def output_table(items: list[Item], meta: dict):
    """The shard's rows as an Arrow table: the columns of the local CSV, typed."""
    import pyarrow as pa

    types = {
        "item_id": pa.string(),
        "line": pa.int64(),
        "image": pa.string(),
        "status": pa.string(),
        "recall_score": pa.float64(),
        "recall_rank": pa.int64(),
        "ranker_score": pa.float64(),
        "final_rank": pa.int64(),
        "selected": pa.int8(),
        "file": pa.string(),
        "detail": pa.string(),
    }
    cols = list(zip(*output_rows(items))) or [[] for _ in OUTPUT_HEADER]
    schema = pa.schema(
        [(n, types[n]) for n in OUTPUT_HEADER], metadata={META_KEY: json.dumps(meta, ensure_ascii=False).encode()}
    )
    return pa.Table.from_arrays([pa.array(list(c), type=types[n]) for n, c in zip(OUTPUT_HEADER, cols)], schema=schema)


def write_stage(batch, shard_dir: str, key: str):
    """Stage 4: ``part-NNNNNN.parquet`` per shard, atomically (a retry rewrites the same file)."""
    import pyarrow.parquet as pq

    _maybe_die("write")
    ks, ns = [], []
    for k, raw in _rows(batch):
        p = pickle.loads(raw)
        table = output_table(p["items"], {"plan": key, "shard": k, "fetch": p["fetch"], "counts": p["counts"]})
        with atomic_path(shard_file(Path(shard_dir), k)) as tmp:
            pq.write_table(table, tmp)
        ks.append(k)
        ns.append(table.num_rows)
    return {"shard": np.array(ks, dtype=np.int64), "rows": np.array(ns, dtype=np.int64)}


# ---------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------
def absolute_paths(args) -> argparse.Namespace:
    """Workers may run elsewhere (another cwd, another node): every path made absolute."""
    a = copy.copy(args)
    for opt in (
        "items",
        "ranker_checkpoint",
        "recall_checkpoint",
        "bert_dir",
        "arch",
        "poi_pic_num",
        "poi_image_vectors",
        "poi_name_vectors",
        "out",
        "html",
        "summary",
        "image_cache",
        "cache_dir",
    ):
        v = getattr(a, opt, None)
        if v:
            setattr(a, opt, os.path.abspath(os.path.expanduser(v)))
    return a


def check_resources(args) -> None:
    """The actor pool must leave a CPU for the fetch/decode tasks and find its GPUs;
    otherwise the pipeline would wait forever."""
    from utils.cli import UserError

    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    if args.actors * args.cpus_per_actor > cpus - 1:
        raise UserError(
            f"--actors {args.actors} x --cpus-per-actor {args.cpus_per_actor:g} leaves "
            f"no CPU of the cluster's {cpus:g} for fetching and decoding: lower one of them"
        )
    if args.actors * args.gpus_per_actor > gpus:
        raise UserError(
            f"--actors {args.actors} x --gpus-per-actor {args.gpus_per_actor:g} needs more "
            f"GPUs than the cluster has ({gpus:g})"
        )


def _map(ds, fn, kw: dict, **retries):
    """``ds.map_batches(fn, **kw)`` with bounded retries (``retries``: Ray remote args).
    Ray 2.5x deprecates passing remote args this way (the defaults retry without bound);
    a Ray that no longer takes them gets its defaults, logged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        try:
            return ds.map_batches(fn, **kw, **retries)
        except TypeError as e:
            log.warning("this Ray does not take %s (%s): its default retries apply", ", ".join(retries), e)
            return ds.map_batches(fn, **kw)


def run_dataset(
    args, steps, shards: list[list[Item]], todo: list[int], shard_dir: Path, key: str, progress: bool
) -> int:
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.max_errored_blocks = 0
    rows = [{"shard": k, "payload": pickle.dumps(shards[k], protocol=pickle.HIGHEST_PROTOCOL)} for k in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # fetch and decode: one CPU task per shard (Ray Data fuses the two: same worker, same node)
    ds = _map(
        ds,
        fetch_stage,
        dict(fn_kwargs={"args": args, "image_cache": steps.image_cache_of(args)}, batch_size=1, num_cpus=1),
        max_retries=TASK_RETRIES,
    )
    ds = _map(ds, decode_stage, dict(fn_kwargs={"args": args}, batch_size=1, num_cpus=1), max_retries=TASK_RETRIES)
    ds = _map(
        ds,
        Select,
        dict(
            fn_constructor_args=(args, steps.load_models, steps.load_tables, steps.select_block, steps.image_backend),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=args.actors),
            num_cpus=args.cpus_per_actor,
            num_gpus=args.gpus_per_actor,
        ),
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
    )
    ds = _map(
        ds,
        write_stage,
        dict(fn_kwargs={"shard_dir": str(shard_dir), "key": key}, batch_size=1, num_cpus=0.25),
        max_retries=TASK_RETRIES,
    )
    written = sorted(int(r["shard"]) for r in ds.iter_rows())
    if written != sorted(todo):
        raise RuntimeError(f"Ray returned shards {written}, expected {sorted(todo)}")
    return len(written)


def merge_shards(cat, shard_dir: Path, n: int) -> tuple[dict, dict, set]:
    """Fill the driver's items from the shard files; returns (fetch counts, counts, backends)."""
    import pyarrow.parquet as pq

    by_line = {c.line: c for c in cat.cands}
    fetch: dict = {}
    counts: dict = {
        "stage2_candidates": 0,
        "distinct_images": 0,
        "images_encoded": {},
        "texts_encoded": 0,
        "items_with_unknown_poi": 0,
        "unknown_pois": set(),
    }
    backends = set()
    for k in range(n):
        t = pq.read_table(shard_file(shard_dir, k))
        meta = json.loads(t.schema.metadata[META_KEY])
        for row in t.to_pylist():
            c = by_line[row["line"]]
            c.status, c.detail, c.file = row["status"], row["detail"], row["file"] or None
            c.recall_score, c.recall_rank = row["recall_score"], row["recall_rank"]
            c.ranker_score, c.final_rank = row["ranker_score"], row["final_rank"]
            c.selected = bool(row["selected"])
        for key, v in meta["fetch"].items():
            fetch[key] = fetch.get(key, 0) + v
        sc = meta["counts"]
        backends.add(sc.pop("backend", None))
        for key, v in sc.items():
            if key == "images_encoded":
                for kk, vv in v.items():
                    counts[key][kk] = counts[key].get(kk, 0) + vv
            elif key == "unknown_pois":
                counts[key].update(v)
            else:
                counts[key] += v
    counts["unknown_pois"] = sorted(counts["unknown_pois"])
    return fetch, counts, backends - {None}


def run(args, steps) -> dict:
    """The --ray run of the pipeline ``steps`` (the select_images module: read_items,
    load_models, load_tables, select_block, summarize, write_html_and_summary, Clock ...); writes
    the same outputs as ``steps.run`` and returns the summary."""
    clock = steps.Clock()
    args = absolute_paths(args)
    progress = not args.no_progress
    csv_out = steps.out_is_csv(args)
    with clock("read"):
        cat = steps.read_items(args)
    with clock("load_models"):  # once here, so a bad checkpoint or table stops before Ray starts
        check = argparse.Namespace(**{**vars(args), "backend": "torch"})
        models = steps.load_models(check, "cpu")
        steps.load_tables(check, models)
        path, hashes = models.path, models.hashes
        del models
    if args.cache_dir:
        log.info(
            "--cache-dir %s is shared by the actors (SQLite; keep it on a local or lock-safe filesystem)",
            args.cache_dir,
        )
    shards = plan_shards(cat.items, args.shard_items)
    shard_dir = shard_dir_of(args, csv_out)
    key = plan_key(args, hashes, len(shards), steps.image_cache_of(args))
    created = not shard_dir.exists()
    try:
        summary = _run_shards(args, steps, cat, shards, shard_dir, key, clock, csv_out)
    finally:  # a run that stopped before writing anything leaves no empty directory
        if created and shard_dir.is_dir() and not any(shard_dir.iterdir()):
            shard_dir.rmdir()
    summary.update(path=path, hashes=hashes)
    return _finish(args, steps, cat, summary, clock, progress)


def _run_shards(args, steps, cat, shards, shard_dir: Path, key: str, clock, csv_out: bool) -> dict:
    """Under the lock of ``shard_dir``: skip finished shards, run the others on Ray, merge."""
    progress = not args.no_progress
    with exclusive_lock(shard_dir):
        done = finished_shards(shard_dir, key, len(shards))
        todo = [k for k in range(len(shards)) if k not in done]
        log.info(
            "%d items in %d shards of %d items: %d already written in %s, %d to do",
            len(cat.items),
            len(shards),
            args.shard_items,
            len(done),
            shard_dir,
            len(todo),
        )
        started = False
        try:
            with clock("ray"):
                if todo:
                    started = connect(args.ray or None)
                    check_resources(args)
                    write_plan(shard_dir, key)
                    run_dataset(args, steps, shards, todo, shard_dir, key, progress)
        finally:
            if started:
                import ray

                ray.shutdown()
        with clock("write"):
            fetch, counts, backends = merge_shards(cat, shard_dir, len(shards))
            if csv_out:
                write_output(args.out, cat.items)
    return {
        "fetch": fetch,
        "counts": counts,
        "backends": backends - {"none"},
        "ray": {
            "address": args.ray or os.environ.get("RAY_ADDRESS") or "local",
            "actors": args.actors,
            "gpus_per_actor": args.gpus_per_actor,
            "shards": len(shards),
            "shards_skipped": len(done),
            "shards_written": len(todo),
            "shard_dir": str(shard_dir),
        },
    }


def _finish(args, steps, cat, r: dict, clock, progress: bool) -> dict:
    summary = steps.summarize(
        args, cat, r["path"], r["hashes"], r["fetch"], r["counts"], "ray", ",".join(sorted(r["backends"])) or "none"
    )
    summary["ray"] = r["ray"]
    steps.write_html_and_summary(args, cat, summary, clock.total(), progress and sys.stderr.isatty())
    return summary
