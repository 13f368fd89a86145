"""A selection run (``Selection``), the steps both runners share and the local runner. The runners take
``load(files, device, backend) -> (models, tables)`` (``models.path``, ``models.hashes``) and
``score(items, models, tables, scoring, clock=None, image_loader=None) -> counts`` as plain functions."""

from __future__ import annotations

from utils.cli import DataError, bad_rows, resolve_device

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    catalogue_rows,
    group_items,
    mark_duplicates,
    output_rows,
    resolve_images,
    write_output,
)
from .shards import POI_TABLES, is_uri, open_dir, put

log = logging.getLogger(__name__)

PAGE_ITEMS = 2000  # the HTML page shows a sample of this many items beyond that


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
        tables = tuple(getattr(self, n) for n in POI_TABLES)
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


def check_rows(path: str, usable: int, errors: list, skip_bad_rows: bool) -> None:
    """The one bad-row rule (refused unless skipped); a catalogue without a usable row is an error either way."""
    if not usable:
        first = f"; first: {errors[0]}" if errors else ""
        raise DataError(f"{path}: no usable rows ({len(errors)} bad{first})")
    bad_rows(errors, path, skip_bad_rows)


def resolve(job: Selection, items: list[Item], progress: bool) -> dict:
    """Local paths and downloads (counts), then duplicates marked."""
    fetch = resolve_images(items, os.path.dirname(os.path.abspath(job.items)), job.image_dir, job.net, progress)
    if n_dup := mark_duplicates(items):
        log.warning("%d rows repeat an image already listed for the same item; scored once, marked duplicate", n_dup)
    return fetch


def add_counts(total: dict, more: dict) -> dict:
    """``more`` added into ``total``: numbers summed, dicts by key, lists joined, strings and sets into sets."""
    for k, v in more.items():
        if isinstance(v, dict):
            add_counts(total.setdefault(k, {}), v)
        elif isinstance(v, list):
            total.setdefault(k, []).extend(v)
        elif isinstance(v, (set, str)):
            total.setdefault(k, set()).update([v] if isinstance(v, str) else v)
        else:
            total[k] = total.get(k, 0) + v
    return total


def tally(items: list[Item]) -> dict:
    """What the summary counts of some items (a Ray run adds up its shards')."""
    cands = [c for it in items for c in it.cands]
    return {
        "items": len(items),
        "candidates": len(cands),
        "status_counts": {s: sum(c.status == s for c in cands) for s in STATUSES},
        "items_selected": sum(it.selected is not None for it in items),
        "no_selection": [[it.line, it.item_id] for it in items if it.selected is None],
    }


def summarize(job: Selection, totals: dict, errors: list, path: str, hashes: dict, device) -> dict:
    """The run's summary: ``totals``, the blocks' ``fetch``, ``counts`` and ``tally`` added up (``add_counts``);
    ``path``, ``hashes``: the models' encode path and weight hashes."""
    counted, counts = totals["tally"], totals["counts"]
    blocks = {k: v for k, v in counts.items() if k != "backend"}
    blocks["unknown_pois"] = sorted(set(blocks.get("unknown_pois", ())))
    return {
        "items_csv": job.items,
        "out": job.out,
        "items": counted["items"],
        "candidates": counted["candidates"],
        "bad_rows": len(errors),
        "bad_row_list": [str(e) for e in errors],
        "encode_path": path,
        "recall_k": job.scoring.recall_k,
        "recall_checkpoint": job.files.recall_checkpoint,
        "ranker_checkpoint": job.files.ranker_checkpoint,
        "recall_weights_sha256": hashes.get("recall"),
        "ranker_recall_copy_sha256": hashes.get("ranker_align"),
        "poi_tables": bool(job.files.poi_tables) and path != "recall-only",
        "items_selected": counted["items_selected"],
        "items_without_readable_candidate": [i for _, i in sorted(counted["no_selection"])],
        "status_counts": counted["status_counts"],
        "downloads": totals["fetch"],
        "image_cache": job.image_dir,
        **blocks,
        "device": str(device),
        "backend": ",".join(sorted(set(counts.get("backend", ())) - {"none"})) or "none",
        "preprocess": job.scoring.enc.preprocess,
        "precision": job.scoring.enc.precision,
    }


def page_sample(items) -> list[Item]:
    """At most PAGE_ITEMS of ``items`` (read once), drawn with a fixed seed, in catalogue order."""
    rng, kept = random.Random(0), []
    for n, it in enumerate(items):
        if n < PAGE_ITEMS:
            kept.append(it)
        elif (j := rng.randrange(n + 1)) < PAGE_ITEMS:
            kept[j] = it
    return sorted(kept, key=lambda it: it.line)


def _report_head(summary: dict, shown: int) -> dict:
    st = summary["status_counts"]
    return {
        "items": summary["items"],
        "candidates": summary["candidates"],
        "selected": summary["items_selected"],
        "without readable candidate": len(summary["items_without_readable_candidate"]),
        "encode path": summary["encode_path"],
        "recall k": summary["recall_k"] if summary["encode_path"] != "recall-only" else "recall only",
        "unreadable/missing/failed": st[UNREADABLE] + st[MISSING] + st[DOWNLOAD_FAILED],
        "duplicates": st[DUPLICATE],
        "unknown POIs": len(summary["unknown_pois"]),
        "bad CSV rows": summary["bad_rows"],
    } | ({"items shown": f"a sample of {shown}"} if shown < summary["items"] else {})


def finish(job: Selection, summary: dict, clock: Clock, items, merge: bool = True) -> dict:
    """The CSV of ``items()`` (``merge`` False: the shards are the output), page and summary: all written or none."""
    unknown = f"POI names lack a table vector (zero vectors), in {summary.get('items_with_unknown_poi')} items"
    for names, what in (
        (summary["items_without_readable_candidate"], "items have no readable candidate and get no selection"),
        ([repr(n) for n in summary["unknown_pois"]], unknown),
    ):
        if names:
            log.warning("%d %s: %s", len(names), what, ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))

    def write_rows(tmp):
        with clock("write"):  # in catalogue order: a Ray run's shards hold the items by the hash of their id
            write_output(tmp, output_rows(sorted(items(), key=lambda it: it.line)))

    def write_page(tmp):
        with clock("html"):
            shown, title = page_sample(items()), f"Image selection: {job.items}"
            head = _report_head(summary, len(shown))
            text, summary["html"] = selection_report(shown, head, title, progress=job.scoring.enc.progress)
            Path(tmp).write_text(text, encoding="utf-8")

    def write_summary(tmp):
        total = clock.timings["total"] = time.perf_counter() - clock.start
        summary["timings_s"] = {k: round(v, 4) for k, v in clock.timings.items()}
        summary["items_per_s"] = round(summary["items"] / max(total, 1e-9), 3)
        write_json(tmp, summary, indent=1)

    remote = is_uri(job.summary_path)  # a URI --out: the summary goes beside it, written last
    outputs = {job.out if merge else None: write_rows, job.html: write_page}
    outputs[None if remote else job.summary_path] = write_summary
    commit_outputs(outputs, {job.out: "--out", job.html: "--html", job.summary_path: "--summary"})
    if remote:
        put(*open_dir(job.summary_path), write_summary)
    n_sel, n, seconds = summary["items_selected"], summary["items"], summary["timings_s"]["total"]
    log.info("wrote %s: %d of %d items selected in %.1f s", job.out, n_sel, n, seconds)
    return summary


def run_local(job: Selection, load: Callable, score: Callable) -> dict:
    """The selection in this process: writes the outputs, returns the summary."""
    clock, enc = Clock(), job.scoring.enc
    device = resolve_device(enc.device)
    with clock("read"):
        errors: list = []
        items = group_items(catalogue_rows(job.items, errors), job.items)
        n = sum(len(it.cands) for it in items)
        check_rows(job.items, n, errors, job.skip_bad_rows)
    log.info("%s: %d items, %d candidate rows, %d bad rows", job.items, len(items), n, len(errors))
    with clock("load_models"):
        models, tables = load(job.files, device, enc.backend)
    with clock("resolve"):
        fetch = resolve(job, items, enc.progress)
    counts = score(items, models, tables, job.scoring, clock=clock)
    totals = add_counts({}, {"fetch": fetch, "counts": counts, "tally": tally(items)})
    summary = summarize(job, totals, errors, models.path, models.hashes, device)
    return finish(job, summary, clock, lambda: items)
