"""The selection on Ray Data (``--ray``): the local run's rows (scores within 1e-5). Each shard not written
goes through ``prepare_stage`` (CPU task: downloads, decoding), ``ScoreShards`` (actor pool, one model set
each) and ``write_stage``; the driver holds counts only. Dead workers are retried, lost shards run again."""

from __future__ import annotations

from utils.cli import UserError, setup_logging

import contextlib
import functools
import json
import logging
import math
import os
import pickle
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace

from utils.io import exclusive_lock

from .catalogue import OK, UNREADABLE, catalogue_rows
from .cluster import FAIL_ENV, connect_ray, count_catalogue, shard_dataset, shard_row
from .run import POI_TABLES, Clock, RayOptions, Selection, add_counts, check_rows, finish, resolve, summarize, tally
from .shards import finished_shards, is_uri, open_dir, plan_key, shard_items, staged_cache, write_shard

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # a CPU task whose worker dies is run again up to this often
ACTOR_RESTARTS = 3  # a scoring actor that dies is restarted up to this often
RUN_ATTEMPTS = 3  # a run that fails on a lost node goes on this often with the shards not written


@contextlib.contextmanager
def _stage(row: dict, name: str, trigger: str):
    """The shard's payload, unpickled; after the block ``payload["where"][name]``: the node (address/id: nodes may
    share an address), seconds. Tests: the first worker to remove ``$AVAS_SELECT_RAY_FAIL_DIR/<trigger>`` dies."""
    import ray

    with contextlib.suppress(FileNotFoundError):
        if d := os.environ.get(FAIL_ENV):
            os.remove(os.path.join(d, trigger))
            print(f"select on Ray: injected failure in {trigger}", file=sys.stderr, flush=True)
            os._exit(1)
    payload, t = pickle.loads(row["payload"]), time.perf_counter()
    yield payload
    node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
    payload.setdefault("where", {})[name] = [node, round(time.perf_counter() - t, 4)]


# --- stages: each takes and returns a shard's row {"shard": k, "payload": pickled dict} (``shard_row``) ---
def _prepare(items, job: Selection) -> tuple[dict, dict]:
    """A shard's images resolved and decoded: ``(fetch counts, {file: array})``."""
    import cv2

    from utils.formats import SIZE, load_image

    cands = [c for it in items for c in it.cands]
    resized = functools.partial(cv2.resize, dsize=(SIZE, SIZE))
    urls, remote = [c for c in cands if c.is_url], is_uri(job.image_dir)
    with staged_cache(job.image_dir, urls) if remote else contextlib.nullcontext(job.image_dir) as cache:
        fetch = resolve(replace(job, image_cache=cache), items, progress=False)
        # each file once, at the model's input size (uint8); (array, decoded?)
        load = functools.cache(lambda file: load_image(file, job.scoring.enc.preprocess, make=resized))
        decoded = [(c, *load(c.file)) for c in cands if c.status == OK]  # by the local copy's name
        for c, _, ok in decoded:
            if not ok:
                c.status, c.detail = UNREADABLE, "does not decode as an image"
    return fetch, {c.file: array for c, array, ok in decoded if ok}  # by the name the cache gave it


def prepare_stage(row: dict, job: Selection) -> dict:
    """Fetch and decode, one CPU task per shard."""
    with _stage(row, "prepare", "decode") as p:
        p["fetch"], p["images"] = _prepare(p["items"], job)
    return shard_row(row["shard"], p)


class ScoreShards:
    """The actor: one model set, loaded once (``load``), and ``score`` on each shard."""

    def __init__(self, load: Callable, score: Callable, job: Selection, device: str, threads: int, log_level):
        import torch

        setup_logging(log_level)
        torch.set_num_threads(threads)
        enc = replace(job.scoring.enc, num_workers=0, progress=False)  # the images are decoded already
        self.score, self.scoring = score, replace(job.scoring, enc=enc)
        self.models, self.tables = load(job.files, device, enc.backend)

    def __call__(self, row: dict) -> dict:
        from utils.formats import ZERO_TENSOR, to_tensor

        with _stage(row, "score", "select") as p:
            images = p.pop("images")  # decoded already: the models' image_loader reads them instead of the files

            def loader(path, mode="reference"):
                a = images.get(str(path))
                return (ZERO_TENSOR.clone(), False) if a is None else (to_tensor(a), True)

            p["counts"] = self.score(p["items"], self.models, self.tables, self.scoring, image_loader=loader)
        return shard_row(row["shard"], p)


def write_stage(row: dict, shard_dir: str, key: str) -> dict:
    """The shard's file; returns its metadata (counts, where its stages ran)."""
    k = int(row["shard"])
    with _stage(row, "write", "write") as p:
        meta = {"plan": key, "shard": k, "fetch": p["fetch"], "counts": p["counts"], "tally": tally(p["items"])}
        meta["where"] = p["where"]  # the write's own time is added after the file is written
        write_shard(shard_dir, k, p["items"], meta)
    return {"meta": json.dumps(meta)}


# --- the driver ----------------------------------------------------------------------------
def absolute(job: Selection) -> Selection:
    """Workers may run elsewhere (another cwd, another node): every path made absolute."""

    def ab(obj, *names):
        made = {n: v if is_uri(v) else os.path.abspath(os.path.expanduser(v)) for n in names if (v := getattr(obj, n))}
        return replace(obj, **made)

    files = ab(job.files, "bert_dir", "ranker_checkpoint", "recall_checkpoint", "arch", *POI_TABLES)
    scoring = replace(job.scoring, enc=ab(job.scoring.enc, "cache_dir"))
    return ab(replace(job, files=files, scoring=scoring), "items", "out", "html", "summary", "image_cache")


def _map(ds, fn, kw: dict, **retries):
    """``ds.map(fn, **kw)`` with bounded retries; a Ray that refuses them keeps its defaults, logged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        try:
            return ds.map(fn, **kw, **retries)
        except TypeError as e:
            log.warning("this Ray does not take %s (%s): its default retries apply", ", ".join(retries), e)
            return ds.map(fn, **kw)


def run_dataset(job: Selection, opts: RayOptions, fns: tuple, plan: dict, done: set[int]):
    """The shards not in ``done`` through the stages (the cluster checked to hold the actors first); yields
    each one's metadata."""
    import ray
    import ray.data

    have = ray.cluster_resources()  # the actors must leave a CPU for the prepare tasks and find their GPUs
    cpus, gpus = opts.actors * opts.cpus_per_actor, opts.actors * opts.gpus_per_actor
    if cpus > have.get("CPU", 0) - 1:
        raise UserError(f"--actors x --cpus-per-actor = {cpus:g} leaves no CPU of {have.get('CPU', 0):g} for decoding")
    if gpus > have.get("GPU", 0):  # else Ray waits for them
        raise UserError(f"--actors x --gpus-per-actor = {gpus:g}: the cluster has {have.get('GPU', 0):g} GPUs")
    partitions = min(plan["shards"], max(1, int(have.get("CPU", 1))))
    ds = shard_dataset(job.items, plan["shards"], done, partitions)
    ds = _map(ds, prepare_stage, dict(fn_kwargs={"job": job}, num_cpus=1), max_retries=TASK_RETRIES)
    device = "cuda" if opts.gpus_per_actor > 0 else "cpu"
    actor = (*fns, job, device, max(1, round(opts.cpus_per_actor)), logging.getLogger().level)
    pool = ray.data.ActorPoolStrategy(size=opts.actors)
    kw = dict(fn_constructor_args=actor, compute=pool, num_cpus=opts.cpus_per_actor, num_gpus=opts.gpus_per_actor)
    ds = _map(ds, ScoreShards, kw, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    kw = dict(fn_kwargs={"shard_dir": plan["dir"], "key": plan["key"]}, num_cpus=0.25)
    for row in _map(ds, write_stage, kw, max_retries=TASK_RETRIES).iter_rows():
        yield json.loads(row["meta"])


def _progress(meta: dict, n_done: int, n: int, nodes: dict) -> None:
    """A shard written: one line, and its share in the per-node record."""
    where, t = meta["where"], meta["tally"]
    encoded = sum(meta["counts"]["images_encoded"].get(stage, 0) for stage in ("stage1", "stage2"))
    share = {"shards": 1, "candidates": t["candidates"], "images_encoded": encoded, "status_counts": t["status_counts"]}
    add_counts(nodes.setdefault(where["score"][0], {}), share)
    for stage, (node, seconds) in where.items():
        add_counts(nodes.setdefault(node, {}), {"seconds": {stage: seconds}})
    stages = ", ".join(f"{s} {sec:.1f} s on {node}" for s, (node, sec) in where.items())
    done = f"{t['candidates']} candidates, {encoded} images encoded"
    log.info("shard %d written (%d of ~%d): %s; %s", meta["shard"], n_done, n, done, stages)


def _run_shards(job: Selection, opts: RayOptions, fns: tuple, plan: dict, rows: int) -> tuple[dict, dict]:
    """The shards not written yet (again after a lost node): ``({shard: metadata}, record)``."""
    from ray.exceptions import RayError, RayTaskError

    fs, d = open_dir(plan["dir"])
    metas = finished_shards(fs, d, plan["key"], plan["shards"])
    done, nodes, t = set(metas), {}, time.perf_counter()
    log.info("~%d shards: %d already in %s", plan["shards"], len(done), plan["dir"])
    for attempt in range(RUN_ATTEMPTS + 1):
        if sum(m["tally"]["candidates"] for m in metas.values()) == rows:
            break
        if attempt == RUN_ATTEMPTS:
            raise RuntimeError(f"the shards in {plan['dir']} do not hold the catalogue's {rows} rows")
        try:
            for meta in run_dataset(job, opts, fns, plan, set(metas)):
                metas[meta["shard"]] = meta
                _progress(meta, len(metas), plan["shards"], nodes)
        except RayError as e:  # a failure of the cluster (a node, its workers or objects lost), not of the input
            if attempt + 1 == RUN_ATTEMPTS or isinstance(e, RayTaskError) and isinstance(e.cause, UserError):
                raise
            log.warning("the run lost part of the cluster (%s); going on with the shards not written", type(e).__name__)
            metas = finished_shards(fs, d, plan["key"], plan["shards"]) | metas  # those not yet seen here
    seconds = time.perf_counter() - t
    return metas, {
        "address": opts.address or os.environ.get("RAY_ADDRESS") or "local",
        "actors": opts.actors,
        "gpus_per_actor": opts.gpus_per_actor,
        "shards": len(metas),
        "shards_skipped": len(done),
        "shards_written": len(metas) - len(done),
        "shard_dir": plan["dir"],
        "nodes": nodes,
        "rows_per_s": round(sum(metas[k]["tally"]["candidates"] for k in set(metas) - done) / max(seconds, 1e-9), 3),
    }


def _select(job: Selection, opts: RayOptions, fns: tuple, clock: Clock, location: str) -> dict:
    import ray.data

    ctx = ray.data.DataContext.get_current()  # for every stage, the count included
    ctx.enable_progress_bars = job.scoring.enc.progress
    ctx.max_errored_blocks = 0
    with clock("count"):
        rows, n_items, errors = count_catalogue(job.items)
    check_rows(job.items, rows, errors, job.skip_bad_rows)
    with clock("load_models"):  # here once, so that a bad checkpoint or table stops before the scoring
        models = fns[0](job.files, "cpu", "torch")[0]
        found, hashes = models.path, models.hashes
        del models
    if job.scoring.enc.cache_dir:
        log.info("the actors share --cache-dir (SQLite: keep it on a local or lock-safe filesystem)")
    plan = {"dir": location, "shards": max(1, math.ceil(n_items / opts.shard_items))}
    plan["key"] = plan_key(job, hashes, plan["shards"], opts.shard_items)
    with clock("ray"):
        metas, record = _run_shards(job, opts, fns, plan, rows)
    blocks = ({k: m[k] for k in ("fetch", "counts", "tally")} for m in metas.values())
    summary = summarize(job, functools.reduce(add_counts, blocks, {}), errors, found, hashes, "ray")
    summary["ray"] = record
    return finish(job, summary, clock, lambda: shard_items(*open_dir(location), metas), merge=location != job.out)


def run_on_ray(job: Selection, opts: RayOptions, load: Callable, score: Callable) -> dict:
    """The selection on Ray: writes the outputs, returns the summary (``load``, ``score``: importable by name)."""
    clock, job = Clock(), absolute(job)
    with clock("read"):  # the header only: a file without the columns stops before Ray starts
        next(catalogue_rows(job.items, []), None)
    location = f"{job.out}.shards" if job.out.lower().endswith(".csv") else job.out
    created = not is_uri(location) and not os.path.exists(location)
    finished_shards(*open_dir(location), None, 0)  # a file not ours in --out: refused before Ray starts
    started = False
    try:
        with contextlib.nullcontext() if is_uri(location) else exclusive_lock(location):
            started = connect_ray(opts.address)
            return _select(job, opts, (load, score), clock, location)
    finally:
        if started:
            import ray

            ray.shutdown()
        if created and os.path.isdir(location) and not os.listdir(location):
            os.rmdir(location)  # a run that stopped before writing anything leaves no empty directory
