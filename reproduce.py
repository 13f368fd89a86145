#!/usr/bin/env python
"""Reproduce the paper's two figures with one command: recall@5 (0.788) and the ranking
pairwise accuracy (0.652). Steps: assets, recall-images, recall-infer, recall-eval,
rank-images, rank-eval (+ taiyi-infer, taiyi-eval with --with-baselines).

A step is one library call, skipped when its outputs exist and its stamp holds the same
arguments and inputs (--force STEP reruns it). Exit status: 0 done, 1 a step failed, 2 bad
arguments or paths, 130 interrupted.
"""

from __future__ import annotations

from utils.cli import UserError, entry_point

import argparse
import logging
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

from utils import args as shared
from utils import cli
from utils.io import exclusive_lock
from utils.reproduction import Step, results_table, run_step

ROOT = Path(__file__).resolve().parent
STEPS = ("assets", "recall-images", "recall-infer", "recall-eval", "rank-images", "rank-eval")
BASELINE_STEPS = ("taiyi-infer", "taiyi-eval")
ALL_STEPS = STEPS + BASELINE_STEPS
MODEL_STEPS = ("recall-infer", "rank-eval", "taiyi-infer")
BERT, POI_TABLES = ("bert_vocab", "bert_config"), ("poi_pic_num", "poi_image_vectors", "poi_name_vectors")
NEEDED_ASSETS = ("recall_csv", "rank_val_csv", *POI_TABLES, "align_weights", "ranker_weights", *BERT)
TAIYI_TEXT = ("taiyi_text_config", "taiyi_text_vocab", "taiyi_text_tokenizer_config", "taiyi_text_special_tokens")
BASELINE_ASSETS = (*TAIYI_TEXT, "taiyi_text_finetuned", "clip_config", "clip_preprocessor_config", "clip_weights")
# the step arguments that name a file (or image folder) the step reads / writes
INPUTS = ("manifest", "csv", "image_dir", "checkpoint", "arch", "results", "versus", *POI_TABLES)
OUTPUTS = ("out", "output", "json", "html", "metrics", "compare")
KS = [1, 5, 10]
log = logging.getLogger("reproduce")


def build_parser() -> argparse.ArgumentParser:
    def steps(text: str, all_steps=STEPS) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        if set(names) - set(ALL_STEPS) - {"all"}:
            raise argparse.ArgumentTypeError(f"unknown step(s) in {text!r}; steps: {', '.join(ALL_STEPS)}")
        return list(all_steps) if names == ["all"] else [s for s in ALL_STEPS if s in names]  # pipeline order

    def error(message):  # one line and exit 2, through cli.entry_point
        raise UserError(f"{message} (see --help)")

    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n\n")[0])
    p.error, add = error, p.add_argument
    add("--steps", type=steps, default="all", help="steps to run, comma-separated (default: all)")
    text = "rerun these steps even when done, or all"
    add("--force", type=partial(steps, all_steps=ALL_STEPS), default="", metavar="STEPS", help=text)
    add("--dest", default=str(ROOT), help="assets go to DEST/data/ and DEST/assets/ (default: here)")
    add("--mirror", metavar="BASE_URL", help="fetch every asset from BASE_URL/<manifest path>")
    add("--manifest", help="asset manifest (default: the project's assets.json)")
    add("--images-dir", help="image folders IMAGES/recall and IMAGES/rank (default: DEST/data/images)")
    text = "figures, reports, step stamps and the log (default: runs/reproduce)"
    add("--out-dir", default=str(ROOT / "runs" / "reproduce"), help=text)
    text = f"concurrent image downloads (default: {shared.IMAGE_DOWNLOADS.workers})"
    add("--workers", type=cli.positive_int, default=shared.IMAGE_DOWNLOADS.workers, help=text)
    text = "image downloads allowed to fail per set: N or P%% of it (default: 20%%)"
    add("--max-failures", type=cli.count_or_percent, default="20%", help=text)
    add("--with-baselines", action="store_true", help="also the Taiyi-CLIP recall baseline")
    add("--no-html", action="store_true", help="no HTML report in recall-eval")
    shared.add_arch(p)
    g = shared.add_engine(p, "model steps (the figures do not depend on these)", precision=False, preprocess=False)
    text = "deprecated alias of --backend"
    g.add_argument("--recall-backend", dest="backend", choices=shared.BACKENDS, default=argparse.SUPPRESS, help=text)
    shared.add_batches(g, None, text=False)
    shared.add_run(p)
    return p


# The calls of the steps: one library call each; None when it went well, else why not. ``how``: the
# command line, for how they run (engine, workers ...), which is not in their stamps.
def fetch(how, manifest: str, only: list, dest: str, mirror: str | None) -> str | None:
    from utils.fetch import fetch_assets, load_manifest, select_assets

    chosen = select_assets(load_manifest(manifest), only)
    s = fetch_assets(chosen, dest, shared.ASSET_DOWNLOADS, mirror=mirror, progress=not how.no_progress)
    print(f"assets: {s['downloaded']} downloaded, {s['skipped']} already present and verified")
    return f"{len(s['failed'])} of {len(chosen)} assets failed" if s["failed"] else None


def images(how, csv: str, out: str) -> str | None:
    from utils.fetch import ImageJob, download_images, image_summary

    net = replace(shared.IMAGE_DOWNLOADS, workers=how.workers)
    s = download_images(ImageJob(csv, out, net, max_failures=how.max_failures, progress=not how.no_progress))
    print(image_summary(s))
    return s["over_budget"]


def recall(how, csv: str, image_dir: str, output: str, model: str, **files) -> None:
    from models import RecallJob, run_recall

    enc = shared.Encoding.from_args(how)
    meta = run_recall(RecallJob(csv, image_dir, output, model=model, files=files, enc=enc, topk=max(KS)))
    print(f"recall: {meta['n_pois']} POIs x {meta['gallery_size']} images, engine {meta['image_backend']}")


def evaluate(how, results: str, json: str, html=None, image_dir=None, versus=None, compare=None) -> None:
    from utils.evaluation import compare_recall, evaluate_recall, format_compare, format_recall

    kw = dict(html=html, image_dir=image_dir, progress=not how.no_progress)
    print(format_recall(evaluate_recall(results=results, ks=KS, json_path=json, **kw)))
    if versus:  # the paired bootstrap: A = results, B = versus (ours), so B - A = ours - them
        print(format_compare(compare_recall(results, versus, KS, compare)))


def pairs(how, **run) -> None:
    from models import PairRun, evaluate_pairs
    from utils.evaluation import format_pair_summary

    print(format_pair_summary(evaluate_pairs(PairRun(**run, enc=shared.Encoding.from_args(how))), run["csv"]))


def step(name: str, call, args: dict, reads: dict | None = None, writes=()) -> Step:
    """A step reading the ``args`` named in INPUTS and ``reads``, writing OUTPUTS' and ``writes``."""
    inputs = {k.replace("_", "-"): v for k, v in args.items() if k in INPUTS and v} | (reads or {})
    return Step(name, call, args, inputs, [v for k, v in args.items() if k in OUTPUTS and v] + list(writes))


def plan(ns, manifest: str, assets: dict) -> dict[str, Step]:
    """This run's steps, their paths from the manifest (under --dest), --images-dir and --out-dir."""
    a = {name: str(Path(ns.dest, path)) for name, path in assets.items()}
    pick = lambda *names: {n: a[n] for n in names}
    out = lambda *parts: str(Path(ns.out_dir, *parts))
    needed = [*NEEDED_ASSETS, *(BASELINE_ASSETS if ns.with_baselines else ())]
    img = {w: str(Path(ns.images_dir, w)) for w in ("recall", "rank")}
    gallery, ours = {"csv": a["recall_csv"], "image_dir": img["recall"]}, out("recall", "top10.csv")
    html = {} if ns.no_html else {"html": out("recall", "report.html"), "image_dir": img["recall"]}
    bert = {"bert_dir": str(Path(a["bert_vocab"]).parent), "arch": ns.arch}
    rank = dict(csv=a["rank_val_csv"], image_dir=img["rank"], checkpoint=a["ranker_weights"], **bert)
    rank |= dict(output=out("rank", "scores.csv"), metrics=out("rank", "metrics.json"), **pick(*POI_TABLES))
    assets_args = dict(manifest=manifest, only=needed, dest=ns.dest, mirror=ns.mirror)
    align = dict(**gallery, output=ours, model="align", checkpoint=a["align_weights"], **bert)
    steps = [
        step("assets", fetch, assets_args, writes=pick(*needed).values()),
        step("recall-images", images, dict(csv=a["recall_csv"], out=img["recall"])),
        step("recall-infer", recall, align, reads=pick(*BERT)),
        step("recall-eval", evaluate, dict(results=ours, json=out("recall", "metrics.json"), **html)),
        step("rank-images", images, dict(csv=a["rank_val_csv"], out=img["rank"])),
        step("rank-eval", pairs, rank, reads=pick(*BERT)),
    ]
    if ns.with_baselines:
        text_dir, clip_dir = (str(Path(a[n]).parent) for n in ("taiyi_text_vocab", "clip_weights"))
        files = dict(taiyi_text_dir=text_dir, taiyi_text_weights=a["taiyi_text_finetuned"], clip_dir=clip_dir)
        theirs = out("baseline", "taiyi_top10.csv")
        taiyi = dict(**gallery, output=theirs, model="taiyi", **files)
        versus = dict(results=theirs, json=out("baseline", "taiyi_metrics.json"), versus=ours)
        versus["compare"] = out("baseline", "compare.json")  # the paired bootstrap, ours - Taiyi
        steps += [
            step("taiyi-infer", recall, taiyi, reads=pick(*BASELINE_ASSETS)),
            step("taiyi-eval", evaluate, versus),
        ]
    return {s.name: s for s in steps if s.name in ns.steps}


def check_args(ns) -> tuple[str, dict]:
    """What a user can get wrong, before any work: (manifest, its asset name -> path)."""
    from utils.fetch import DEFAULT_MANIFEST, load_manifest

    manifest = str(cli.input_file(ns.manifest, "--manifest") if ns.manifest else DEFAULT_MANIFEST)
    assets = {a.name: a.path for a in load_manifest(manifest)}
    ns.with_baselines = ns.with_baselines or bool(set(ns.steps) & set(BASELINE_STEPS))
    if ns.with_baselines and set(STEPS) <= set(ns.steps):
        ns.steps = list(dict.fromkeys(ns.steps + list(BASELINE_STEPS)))
    if "taiyi-infer" in ns.steps:  # an opt-in extra: name it before anything is downloaded
        cli.require("transformers", "taiyi", "--with-baselines")
    if lacking := [n for n in NEEDED_ASSETS + BASELINE_ASSETS * ns.with_baselines if n not in assets]:
        raise UserError(f"{manifest}: lacks the asset(s) {', '.join(lacking)}")
    dest = ns.dest if "assets" in ns.steps else None
    cli.check_files({"--arch": ns.arch}, out_dirs={"--out-dir": ns.out_dir, "--dest": dest})
    ns.images_dir = ns.images_dir or str(Path(ns.dest, "data", "images"))
    for w in ("recall", "rank"):
        if f"{w}-images" in ns.steps:
            cli.output_dir(Path(ns.images_dir, w), "--images-dir")
    if set(MODEL_STEPS) & set(ns.steps):
        cli.resolve_device(ns.device)  # --device cuda without a GPU: exit 2 now, not in a step
    return manifest, assets


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    steps, out = plan(ns, *check_args(ns)), Path(ns.out_dir)
    with exclusive_lock(out, ".reproduce.lock"), cli.logging_to(out / "reproduce.log"):  # the steps' messages too
        cli.setup_logging(ns.log_level)
        log.info("reproduce: %s", vars(ns))
        for name, s in steps.items():  # in pipeline order; the first failure stops the run
            if not run_step(s, ns, out, name in ns.force, ",".join(ALL_STEPS[: ALL_STEPS.index(name)])):
                return 1
        if text := results_table(ns.out_dir, ns.images_dir, ns.with_baselines):  # also in OUT/results.{md,json}
            print(f"\n{text}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
