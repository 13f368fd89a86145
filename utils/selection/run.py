"""A selection run: what it is (``Selection``, ``ModelFiles``, ``Scoring``, ``RayOptions``),
the steps both runners share (the catalogue under the bad-row rule, image resolution,
the summary, the outputs committed together) and the local runner.

The runners are given the model loader and the scoring of a block of items as plain
functions (``models.engine``: ``load_selection_models``, ``score_block``):

    load(files, device, backend) -> (models, tables)       # models.path, models.hashes
    score(items, models, tables, scoring, clock=None, image_loader=None) -> counts
"""

from __future__ import annotations

from utils.cli import DataError, bad_rows, resolve_device

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from utils.args import Downloads, Encoding
from utils.evaluation import selection_report
from utils.io import commit_outputs, write_json

from .catalogue import (
    DOWNLOAD_FAILED,
    DUPLICATE,
    MISSING,
    STATUSES,
    UNREADABLE,
    Item,
    mark_duplicates,
    read_catalogue,
    resolve_images,
    write_output,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    """What the models and the POI tables are loaded from."""

    bert_dir: str
    ranker_checkpoint: str | None = None  # required unless recall_only
    recall_checkpoint: str | None = None  # stage 1; default: the ranker's own copy
    arch: str | None = None
    poi_pic_num: str | None = None  # the three POI tables: all or none
    poi_image_vectors: str | None = None
    poi_name_vectors: str | None = None
    trust_pickle: bool = False
    recall_only: bool = False  # no ranker: select by recall score

    @property
    def poi_tables(self) -> tuple[str, str, str] | None:
        tables = (self.poi_pic_num, self.poi_image_vectors, self.poi_name_vectors)
        return tables if all(tables) else None


@dataclass(frozen=True)
class Scoring:
    """How a block of items is scored: the short list's length and the engine settings."""

    recall_k: int = 5
    enc: Encoding = Encoding()


@dataclass(frozen=True)
class Selection:
    """One selection run: the catalogue, the models, how to score, where the outputs go."""

    items: str
    out: str
    files: ModelFiles
    scoring: Scoring = Scoring()
    html: str | None = None
    summary: str | None = None  # default <out>.summary.json
    image_cache: str | None = None  # downloaded images; default <out>.images
    net: Downloads = Downloads()  # how URL images are downloaded
    skip_bad_rows: bool = False

    @property
    def summary_path(self) -> str:
        return self.summary or f"{self.out.rstrip('/')}.summary.json"

    @property
    def image_dir(self) -> str:
        return self.image_cache or f"{self.out.rstrip('/')}.images"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started in-process
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    shard_items: int = 64


class Clock:
    """``with clock("step"):`` adds the step's wall time to ``clock.timings``."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def total(self) -> dict:
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings


@dataclass
class Catalogue:
    path: str
    items: list[Item]
    errors: list = field(default_factory=list)

    @property
    def cands(self):
        return [c for it in self.items for c in it.cands]


def read_items(job: Selection) -> Catalogue:
    errors: list = []
    return check_catalogue(Catalogue(job.items, read_catalogue(job.items, errors), errors), job.skip_bad_rows)


def check_catalogue(cat: Catalogue, skip_bad_rows: bool) -> Catalogue:
    """The one bad-row rule, applied where the rows come together (they may have been
    read in parts, each part collecting its RowErrors): bad rows are refused unless
    skipped; a catalogue without a usable row is an error either way."""
    if not cat.cands:
        first = f"; first: {cat.errors[0]}" if cat.errors else ""
        raise DataError(f"{cat.path}: no usable rows ({len(cat.errors)} bad{first})")
    bad_rows(cat.errors, cat.path, skip_bad_rows)
    log.info("%s: %d items, %d candidate rows, %d bad rows", cat.path, len(cat.items), len(cat.cands), len(cat.errors))
    return cat


def resolve(job: Selection, items: list[Item], progress: bool) -> dict:
    """Local paths and downloads (counts), then duplicates marked."""
    csv_dir = os.path.dirname(os.path.abspath(job.items))
    fetch = resolve_images(items, csv_dir, job.image_dir, job.net, progress)
    n_dup = mark_duplicates(items)
    if n_dup:
        log.warning("%d rows repeat an image already listed for the same item; scored once, marked duplicate", n_dup)
    return fetch


def add_counts(total: dict, more: dict) -> dict:
    """``more`` added into ``total``: numbers summed, dicts by key, names (lists, strings)
    collected in sets."""
    for k, v in more.items():
        if isinstance(v, dict):
            add_counts(total.setdefault(k, {}), v)
        elif isinstance(v, (list, set, str)):
            total.setdefault(k, set()).update([v] if isinstance(v, str) else v)
        else:
            total[k] = total.get(k, 0) + v
    return total


def summarize(job: Selection, cat: Catalogue, path: str, hashes: dict, fetch: dict, counts: dict, device) -> dict:
    """The summary of a run (``counts``: the blocks' counts, added up)."""
    no_sel = [it.item_id for it in cat.items if it.selected is None]
    blocks = {k: v for k, v in counts.items() if k != "backend"}
    blocks["unknown_pois"] = sorted(blocks.get("unknown_pois", ()))
    enc = job.scoring.enc
    return {
        "items_csv": job.items,
        "out": job.out,
        "items": len(cat.items),
        "candidates": len(cat.cands),
        "bad_rows": len(cat.errors),
        "bad_row_list": [str(e) for e in cat.errors],
        "encode_path": path,
        "recall_k": job.scoring.recall_k,
        "recall_checkpoint": job.files.recall_checkpoint,
        "ranker_checkpoint": job.files.ranker_checkpoint,
        "recall_weights_sha256": hashes.get("recall"),
        "ranker_recall_copy_sha256": hashes.get("ranker_align"),
        "poi_tables": bool(job.files.poi_tables) and path != "recall-only",
        "items_selected": len(cat.items) - len(no_sel),
        "items_without_readable_candidate": no_sel,
        "status_counts": {s: sum(c.status == s for c in cat.cands) for s in STATUSES},
        "downloads": fetch,
        "image_cache": job.image_dir,
        **blocks,
        "device": str(device),
        "backend": ",".join(sorted(set(counts.get("backend", ())) - {"none"})) or "none",
        "preprocess": enc.preprocess,
        "precision": enc.precision,
    }


def _report_head(job: Selection, summary: dict) -> dict:
    st = summary["status_counts"]
    return {
        "items": summary["items"],
        "candidates": summary["candidates"],
        "selected": summary["items_selected"],
        "without readable candidate": len(summary["items_without_readable_candidate"]),
        "encode path": summary["encode_path"],
        "recall k": job.scoring.recall_k if summary["encode_path"] != "recall-only" else "recall only",
        "unreadable/missing/failed": st[UNREADABLE] + st[MISSING] + st[DOWNLOAD_FAILED],
        "duplicates": st[DUPLICATE],
        "unknown POIs": len(summary["unknown_pois"]),
        "bad CSV rows": summary["bad_rows"],
    }


def _warn(summary: dict) -> None:
    no_sel, unknown = summary["items_without_readable_candidate"], summary["unknown_pois"]
    if no_sel:
        shown = ", ".join(no_sel[:10]) + (" ..." if len(no_sel) > 10 else "")
        log.warning("%d items have no readable candidate and get no selection: %s", len(no_sel), shown)
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        n_items = summary["items_with_unknown_poi"]
        log.warning("%d POI names lack a table vector (zero vectors), in %d items: %s", len(unknown), n_items, shown)


def finish(job: Selection, cat: Catalogue, summary: dict, clock: Clock, rows: bool = True) -> dict:
    """The selection CSV (``rows``; the Ray shards may be the output instead), the HTML
    page and the summary, committed together or not at all. A write that fails (disk
    full, file-size limit) is one ``UserError`` naming the output."""
    _warn(summary)

    def write_rows(tmp):
        with clock("write"):
            write_output(tmp, cat.items)

    def write_page(tmp):
        with clock("html"):
            text, summary["html"] = selection_report(
                cat.items,
                _report_head(job, summary),
                f"Image selection: {job.items}",
                progress=job.scoring.enc.progress,
            )
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

    def write_summary(tmp):
        timings = clock.total()
        summary["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
        summary["items_per_s"] = round(len(cat.items) / max(timings["total"], 1e-9), 3)
        write_json(tmp, summary, indent=1)

    outputs = {job.out if rows else None: write_rows, job.html: write_page, job.summary_path: write_summary}
    commit_outputs(outputs, {job.out: "--out", job.html: "--html", job.summary_path: "--summary"})
    n_sel, n, seconds = summary["items_selected"], summary["items"], summary["timings_s"]["total"]
    log.info("wrote %s: %d of %d items selected in %.1f s", job.out, n_sel, n, seconds)
    return summary


def run_local(job: Selection, load: Callable, score: Callable) -> dict:
    """The selection in this process: writes the outputs, returns the summary."""
    clock, enc = Clock(), job.scoring.enc
    device = resolve_device(enc.device)
    with clock("read"):
        cat = read_items(job)
    with clock("load_models"):
        models, tables = load(job.files, device, enc.backend)
    with clock("resolve"):
        fetch = resolve(job, cat.items, enc.progress)
    counts = add_counts({}, score(cat.items, models, tables, job.scoring, clock=clock))
    summary = summarize(job, cat, models.path, models.hashes, fetch, counts, device)
    return finish(job, cat, summary, clock)
