"""The selection on Ray Data (``select_images.py --ray``), with the local run's rows,
ranks and selections (scores within 1e-5).

The driver reads the catalogue into items (the bad-row rule applied to every row's
errors), loads the models once to check them, and cuts the items into shards of
``shard_items``: the unit of work, of retries and of the output files. Each shard not
written yet goes through ``prepare_stage`` (CPU task: paths, downloads, duplicates,
images decoded to 224 x 224 uint8), ``ScoreShards`` (actor pool, one model set per
actor: the block scoring of the local run) and ``write_stage`` (``part-NNNNNN.parquet``,
atomically). The driver merges the shards into the CSV ``--out`` (without ``.csv``,
``--out`` is the directory of shards) and writes the page and the summary. Workers that
die are retried; a rerun of the same plan skips the finished shards. On a cluster every
node must see the same paths; Ray ships the project's code.
"""

from __future__ import annotations

from utils.cli import UserError, setup_logging

import functools
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from utils.io import exclusive_lock

from .catalogue import OK, UNREADABLE, Item
from .run import Clock, RayOptions, Selection, finish, read_items, resolve, summarize
from .shards import POI_TABLES, finished_shards, merge_shards, plan_key, write_plan, write_shard

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TASK_RETRIES = 3  # a CPU task whose worker dies is run again up to this often
ACTOR_RESTARTS = 3  # a scoring actor that dies is restarted up to this often
FAIL_ENV = "AVAS_SELECT_RAY_FAIL_DIR"  # tests: a file <dir>/<stage> makes that stage's worker die once
PASS_ENV = ("AVAS_ONNX_CACHE", FAIL_ENV, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
EXCLUDES = [".git/", ".venv/", "data/", "assets/", "runs/", "**/__pycache__/"]
EXCLUDES += ["*.pth", "*.ckpt", "*.npy", "*.npz", "*.onnx", "*.parquet"]


# --- the Ray session -------------------------------------------------------------------------
def runtime_env(address: str | None) -> dict:
    """Workers import this project: on a local Ray through PYTHONPATH, on a cluster by
    shipping the code (``working_dir``; data files left out)."""
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    if address:
        return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return {"env_vars": env}


def connect_ray(address: str | None = None, **init_kw) -> bool:
    """Join ``address`` (or RAY_ADDRESS), else start a local Ray in this process.
    Returns True when this call started the session (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw = dict(include_dashboard=False, log_to_driver=True) if not address else {}
    try:
        ray.init(address=address, runtime_env=runtime_env(address), **{**kw, **init_kw})
    except ConnectionError as e:
        raise UserError(f"--ray {address}: cannot join the Ray cluster ({e})") from None
    log.info("Ray %s: %s", "cluster " + address if address else "started locally", ray.cluster_resources())
    return True


def _maybe_die(stage: str) -> None:
    """Tests: when ``$AVAS_SELECT_RAY_FAIL_DIR/<stage>`` exists, the first worker to remove
    it dies as a crashed process would."""
    d = os.environ.get(FAIL_ENV)
    if not d:
        return
    try:
        os.remove(os.path.join(d, stage))
    except FileNotFoundError:
        return
    print(f"select on Ray: injected failure in {stage}", file=sys.stderr, flush=True)
    os._exit(1)


# --- stages: each takes and returns a batch of shard rows {"shard": [...], "payload": [...]} --
def _rows(batch):
    return zip(batch["shard"].tolist(), batch["payload"])


def _batch(rows: list[tuple[int, object]]) -> dict:
    payload = np.empty(len(rows), dtype=object)
    payload[:] = [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for _, p in rows]
    return {"shard": np.array([k for k, _ in rows], dtype=np.int64), "payload": payload}


def _decode(path: str, mode: str):
    """The image at the model's input size (uint8), None when it does not decode; the
    normalisation runs in the actor."""
    import cv2

    from utils.formats import SIZE, decode_rgb

    try:
        return cv2.resize(decode_rgb(path, mode), (SIZE, SIZE))
    except Exception as e:  # any decode failure, as utils.formats.load_image
        log.warning("unreadable image %s (%s: %s)", path, type(e).__name__, e)
        return None


def prepare_stage(batch, job: Selection):
    """Fetch and decode, one CPU task per shard."""
    _maybe_die("decode")
    out = []
    for k, raw in _rows(batch):
        items: list[Item] = pickle.loads(raw)
        fetch = resolve(job, items, progress=False)
        arrays: dict = {}
        for c in (c for it in items for c in it.cands if c.status == OK):
            if c.file not in arrays:
                arrays[c.file] = _decode(c.file, job.scoring.enc.preprocess)
            if arrays[c.file] is None:
                c.status, c.detail = UNREADABLE, "does not decode as an image"
        images = {f: a for f, a in arrays.items() if a is not None}
        out.append((k, {"items": items, "fetch": fetch, "images": images}))
    return _batch(out)


def decoded_image(arrays: dict, path, mode="reference"):
    """The actors' ``image_loader`` (with ``arrays``, a shard's decoded images, bound)."""
    from utils.formats import ZERO_TENSOR, to_tensor

    a = arrays.get(str(path))
    return (ZERO_TENSOR.clone(), False) if a is None else (to_tensor(a), True)


class ScoreShards:
    """The actor: one model set, loaded once (``load``), and ``score`` on each shard."""

    def __init__(self, load: Callable, score: Callable, job: Selection, device: str, threads: int, log_level):
        import torch

        setup_logging(log_level)
        torch.set_num_threads(threads)
        enc = replace(job.scoring.enc, num_workers=0, progress=False)  # the images are decoded already
        self.score, self.scoring = score, replace(job.scoring, enc=enc)
        self.models, self.tables = load(job.files, device, enc.backend)

    def __call__(self, batch):
        _maybe_die("select")
        out = []
        for k, raw in _rows(batch):
            p = pickle.loads(raw)
            loader = functools.partial(decoded_image, p["images"])
            counts = self.score(p["items"], self.models, self.tables, self.scoring, image_loader=loader)
            out.append((k, {"items": p["items"], "fetch": p["fetch"], "counts": counts}))
        return _batch(out)


def write_stage(batch, shard_dir: str, key: str):
    """``part-NNNNNN.parquet`` per shard, atomically (a retry rewrites the same file)."""
    _maybe_die("write")
    ks = []
    for k, raw in _rows(batch):
        p = pickle.loads(raw)
        meta = {"plan": key, "shard": k, "fetch": p["fetch"], "counts": p["counts"]}
        write_shard(Path(shard_dir), k, p["items"], meta)
        ks.append(k)
    return {"shard": np.array(ks, dtype=np.int64)}


# --- the driver ----------------------------------------------------------------------------
def absolute(job: Selection) -> Selection:
    """Workers may run elsewhere (another cwd, another node): every path made absolute."""

    def ab(obj, *names):
        return replace(obj, **{n: os.path.abspath(os.path.expanduser(v)) for n in names if (v := getattr(obj, n))})

    files = ab(job.files, "bert_dir", "ranker_checkpoint", "recall_checkpoint", "arch", *POI_TABLES)
    scoring = replace(job.scoring, enc=ab(job.scoring.enc, "cache_dir"))
    return ab(replace(job, files=files, scoring=scoring), "items", "out", "html", "summary", "image_cache")


def check_resources(opts: RayOptions) -> None:
    """The actors must leave a CPU for the prepare tasks and find their GPUs; otherwise the
    pipeline would wait forever."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = opts.actors * opts.cpus_per_actor, opts.actors * opts.gpus_per_actor
    if cpus > have.get("CPU", 0) - 1:
        raise UserError(f"--actors x --cpus-per-actor = {cpus:g} leaves no CPU of {have.get('CPU', 0):g} for decoding")
    if gpus > have.get("GPU", 0):
        raise UserError(f"--actors x --gpus-per-actor = {gpus:g}: the cluster has {have.get('GPU', 0):g} GPUs")


def _map(ds, fn, kw: dict, **retries):
    """``ds.map_batches(fn, **kw)`` with bounded retries (Ray remote args). Ray 2.5x
    deprecates passing them this way (its defaults retry without bound); a Ray that no
    longer takes them gets its defaults, logged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        try:
            return ds.map_batches(fn, **kw, **retries)
        except TypeError as e:
            log.warning("this Ray does not take %s (%s): its default retries apply", ", ".join(retries), e)
            return ds.map_batches(fn, **kw)


def run_dataset(job, opts: RayOptions, load, score, shards: list, todo: list[int], shard_dir: Path, key: str) -> None:
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = job.scoring.enc.progress
    ctx.max_errored_blocks = 0
    rows = [{"shard": k, "payload": pickle.dumps(shards[k], protocol=pickle.HIGHEST_PROTOCOL)} for k in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = _map(ds, prepare_stage, dict(fn_kwargs={"job": job}, batch_size=1, num_cpus=1), max_retries=TASK_RETRIES)
    device = "cuda" if opts.gpus_per_actor > 0 else "cpu"
    actor = (load, score, job, device, max(1, round(opts.cpus_per_actor)), logging.getLogger().level)
    pool = ray.data.ActorPoolStrategy(size=opts.actors)
    kw = dict(fn_constructor_args=actor, batch_size=1, compute=pool, num_cpus=opts.cpus_per_actor)
    kw["num_gpus"] = opts.gpus_per_actor
    ds = _map(ds, ScoreShards, kw, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    kw = dict(fn_kwargs={"shard_dir": str(shard_dir), "key": key}, batch_size=1, num_cpus=0.25)
    ds = _map(ds, write_stage, kw, max_retries=TASK_RETRIES)
    written = sorted(int(r["shard"]) for r in ds.iter_rows())
    if written != sorted(todo):
        raise RuntimeError(f"Ray returned shards {written}, expected {sorted(todo)}")


def _run_shards(job, opts: RayOptions, load, score, shards: list, shard_dir: Path, key: str) -> dict:
    """The shards not written yet, on Ray; returns the summary's ``ray`` record."""
    done = finished_shards(shard_dir, key, len(shards))
    todo = [k for k in range(len(shards)) if k not in done]
    log.info("%d shards: %d already in %s, %d to do", len(shards), len(done), shard_dir, len(todo))
    started = False
    try:
        if todo:
            started = connect_ray(opts.address)
            check_resources(opts)
            write_plan(shard_dir, key)
            run_dataset(job, opts, load, score, shards, todo, shard_dir, key)
    finally:
        if started:
            import ray

            ray.shutdown()
    return {
        "address": opts.address or os.environ.get("RAY_ADDRESS") or "local",
        "actors": opts.actors,
        "gpus_per_actor": opts.gpus_per_actor,
        "shards": len(shards),
        "shards_skipped": len(done),
        "shards_written": len(todo),
        "shard_dir": str(shard_dir),
    }


def run_on_ray(job: Selection, opts: RayOptions, load: Callable, score: Callable) -> dict:
    """The selection on Ray (the module's docstring); writes the local run's outputs and
    returns the summary. ``load`` and ``score`` are the model loader and the block
    scoring: plain functions, which the actors import by name."""
    clock, job = Clock(), absolute(job)
    with clock("read"):
        cat = read_items(job)
    with clock("load_models"):  # here once, so that a bad checkpoint or table stops before Ray starts
        models, _ = load(job.files, "cpu", "torch")
        path, hashes = models.path, models.hashes
        del models
    if job.scoring.enc.cache_dir:
        log.info("the actors share --cache-dir (SQLite: keep it on a local or lock-safe filesystem)")
    shards = [cat.items[a : a + opts.shard_items] for a in range(0, len(cat.items), opts.shard_items)]
    csv_out = job.out.lower().endswith(".csv")
    shard_dir = Path(f"{job.out}.shards") if csv_out else Path(job.out)
    key = plan_key(job, hashes, len(shards), opts.shard_items)
    created = not shard_dir.exists()
    try:
        with exclusive_lock(shard_dir):
            with clock("ray"):
                record = _run_shards(job, opts, load, score, shards, shard_dir, key)
            with clock("write"):
                fetch, counts = merge_shards(cat, shard_dir, len(shards))
            summary = summarize(job, cat, path, hashes, fetch, counts, "ray")
            summary["ray"] = record
            return finish(job, cat, summary, clock, rows=csv_out)
    finally:  # a run that stopped before writing anything leaves no empty directory
        if created and shard_dir.is_dir() and not any(shard_dir.iterdir()):
            shard_dir.rmdir()
