#!/usr/bin/env python
"""Reproduce the paper's two figures with one command: recall@5 (0.788) and the ranking
pairwise accuracy (0.652).

    python reproduce.py                                   # everything, from the published files
    python reproduce.py --mirror http://host/avas         # air-gapped: every file from a mirror
    python reproduce.py --steps assets,recall-images      # some steps only
    python reproduce.py --force rank-eval                 # rerun a step that is up to date
    python reproduce.py --with-baselines                  # also the Taiyi-CLIP recall baseline

Steps, in order (each is also a script of its own, see the README):

  assets         download_assets.py: CSVs into DEST/data/, POI tables, weights and
                 bert-base-chinese files into DEST/assets/ (sha256-verified)
  recall-images  download_images.py on the recall CSV  -> IMAGES/recall/
  recall-infer   recall_infer.py (every POI name vs every image) -> OUT/recall/top10.csv
  recall-eval    recall_eval.py (recall@1/5/10, MRR, HTML report) -> OUT/recall/metrics.json
  rank-images    download_images.py on the ranking val CSV -> IMAGES/rank/
  rank-eval      rank_eval.py (pairwise accuracy, ROC-AUC, log loss) -> OUT/rank/metrics.json

With --with-baselines (the paper's comparison; assets fetched by the assets step too):

  taiyi-infer    recall_infer.py --model taiyi (Taiyi-CLIP with the authors' fine-tuned
                 text encoder) on the same gallery -> OUT/baseline/taiyi_top10.csv
  taiyi-eval     recall_eval.py on it -> OUT/baseline/taiyi_metrics.json, and
                 recall_eval.py --compare (paired bootstrap, Taiyi vs ours) ->
                 OUT/baseline/compare.json

A step is skipped when it is up to date: its stamp ``OUT/steps/<step>.done.json``
records the identities (size + mtime; a listing digest for image folders) of the
inputs that produced its outputs, the arguments that matter, and the outputs
themselves; when any of these changed (or an output is gone) the step runs again.
The assets step is up to date when every asset is present with its verified sha256
(no request is made then). ``--force STEP[,STEP]`` (or ``all``) reruns regardless.

The published image URLs are old and some images are gone: image failures up to
``--max-failures`` (default 20%% of the images) are reported, not fatal, and the
evaluation uses what was downloaded (missing recall images leave the gallery; a pair
with a missing image is scored with the all-zero image, as the authors' scripts did).

At the end: a table metric / paper / ours / difference (with --with-baselines also the
Taiyi-CLIP figures, the paper's Taiyi figure, unknown: "-", and ours - Taiyi with its
paired 95% bootstrap interval), written also as
``OUT/results.json`` and ``OUT/results.md``; the log of the run is ``OUT/reproduce.log``.

Exit status: 0 done, 1 a step failed (the message says which and why), 2 bad arguments
(or --device cuda without a GPU).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
STEPS = ("assets", "recall-images", "recall-infer", "recall-eval", "rank-images", "rank-eval")
BASELINE_STEPS = ("taiyi-infer", "taiyi-eval")
ALL_STEPS = STEPS + BASELINE_STEPS
NEEDED_ASSETS = ("recall_csv", "rank_val_csv", "poi_pic_num", "poi_image_vectors",
                 "poi_name_vectors", "align_weights", "ranker_weights", "bert_vocab", "bert_config")
BASELINE_ASSETS = ("taiyi_text_config", "taiyi_text_vocab", "taiyi_text_tokenizer_config",
                   "taiyi_text_special_tokens", "taiyi_text_finetuned", "clip_config",
                   "clip_preprocessor_config", "clip_weights")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
PAPER = {"recall@5": 0.788, "ranking accuracy": 0.652}
PAPER_TAIYI: dict = {}  # the paper's Taiyi-CLIP figures: not published in a form found so far
STAMP_VERSION = 1

log = logging.getLogger("reproduce")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def _step_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(STEPS)
    bad = [n for n in names if n not in ALL_STEPS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(bad)}; steps: {', '.join(ALL_STEPS)}")
    return [s for s in ALL_STEPS if s in names]  # always in pipeline order


def _failures(text: str) -> str:
    t = text.strip()
    try:
        v = float(t[:-1]) if t.endswith("%") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-failures expects N or P%, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("--max-failures must be >= 0")
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce.py", description=__doc__.split("\n\n")[0],
        epilog="Steps: " + ", ".join(STEPS) + ". See the module docstring / README for details.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=_step_list, default="all",
                   help="comma-separated steps to run (in pipeline order), or all")
    p.add_argument("--force", type=_step_list, default="", metavar="STEPS",
                   help="rerun these steps even when up to date (comma-separated, or all)")
    p.add_argument("--dest", default=str(ROOT),
                   help="where the assets go: DEST/data/ (CSVs) and DEST/assets/ (tables, weights, bert)")
    p.add_argument("--mirror", default=None, metavar="BASE_URL",
                   help="fetch every asset from BASE_URL/<manifest path> (see download_assets.py)")
    p.add_argument("--manifest", default=None, help="asset manifest; default: assets.json of the project")
    p.add_argument("--images-dir", default=None,
                   help="image folders IMAGES/recall and IMAGES/rank; default: DEST/data/images")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "reproduce"),
                   help="figures, reports, step stamps and the log")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=16, help="concurrent image downloads")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding processes of the model steps; default: the scripts' own")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch in the model steps")
    p.add_argument("--recall-backend", choices=("torch", "onnx"), default="torch",
                   help="image tower of recall-infer: onnx (ONNX Runtime, checked against torch to "
                        "1e-5) is about twice as fast on a CPU; results do not depend on it, so a "
                        "change does not rerun the step")
    p.add_argument("--arch", default=None, metavar="FILE.json",
                   help="architecture of a non-default (small) model, passed to both model steps")
    p.add_argument("--max-failures", type=_failures, default="20%",
                   help="image downloads allowed to fail per set before the run stops: N or P%% "
                        "of the set's images")
    p.add_argument("--with-baselines", action="store_true",
                   help="also the Taiyi-CLIP recall baseline (its assets, taiyi-infer, taiyi-eval) "
                        "and its figures in the final table")
    p.add_argument("--no-html", action="store_true", help="no HTML report in recall-eval")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------
# identities and stamps
# ---------------------------------------------------------------------------
def identity(path) -> dict | None:
    """What a file or image folder is, cheaply: size + mtime (files) or a digest of the
    (name, size, mtime) listing of the image files (folders). None when absent."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_dir():
        h, n = hashlib.sha256(), 0
        for f in sorted(p.iterdir()):
            if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                st = f.stat()
                h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                n += 1
        return {"path": str(p), "files": n, "listing_sha256": h.hexdigest()}
    return None


@dataclass
class Step:
    name: str
    inputs: dict                          # role -> path (files or image folders)
    outputs: dict                         # role -> path
    params: dict                          # arguments that change the outputs
    run: Callable[[], int]
    summary: Callable[[], dict] = field(default=lambda: {})

    def fingerprint(self) -> dict:
        return {"inputs": {k: identity(v) for k, v in self.inputs.items()}, "params": self.params}


def stamp_path(out_dir: Path, step: str) -> Path:
    return out_dir / "steps" / f"{step}.done.json"


def up_to_date(step: Step, out_dir: Path) -> tuple[bool, str]:
    """(valid, reason) for the step's stamp."""
    sp = stamp_path(out_dir, step.name)
    if not sp.is_file():
        return False, "never completed"
    try:
        st = json.loads(sp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, f"unreadable stamp {sp}"
    if st.get("version") != STAMP_VERSION:
        return False, "stamp of another version"
    now = step.fingerprint()
    if st.get("params") != now["params"]:
        return False, "arguments changed"
    changed = [k for k, v in now["inputs"].items() if st.get("inputs", {}).get(k) != v]
    if changed:
        return False, "input changed: " + ", ".join(changed)
    gone = [k for k, v in step.outputs.items() if identity(v) is None]
    if gone:
        return False, "output missing: " + ", ".join(gone)
    diff = [k for k, v in step.outputs.items() if st.get("outputs", {}).get(k) != identity(v)]
    if diff:
        return False, "output changed since: " + ", ".join(diff)
    return True, f"up to date since {st.get('finished', '?')}"


def write_stamp(step: Step, out_dir: Path, seconds: float, summary: dict,
                fingerprint: dict | None = None) -> None:
    """``fingerprint``: the inputs as the step read them, taken before it ran (default:
    now), so an input replaced while the step ran makes the stamp stale, not valid."""
    sp = stamp_path(out_dir, step.name)
    sp.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": STAMP_VERSION, "step": step.name, **(fingerprint or step.fingerprint()),
           "outputs": {k: identity(v) for k, v in step.outputs.items()},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 2),
           "summary": summary}
    tmp = sp.with_name(sp.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, sp)


def read_stamp_summary(out_dir: Path, step: str) -> dict:
    try:
        return json.loads(stamp_path(out_dir, step).read_text(encoding="utf-8")).get("summary", {})
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------
class Ctx:
    def __init__(self, args, device: str):
        import download_assets  # noqa: PLC0415 - light; the model scripts import torch lazily below
        from utils.assets import DEFAULT_MANIFEST, load_manifest  # noqa: PLC0415

        self.args, self.device = args, device
        self.dest = Path(args.dest)
        self.manifest = args.manifest or str(DEFAULT_MANIFEST)
        self.assets = {a.name: a for a in load_manifest(self.manifest)}
        self.needed = NEEDED_ASSETS + (BASELINE_ASSETS if args.with_baselines else ())
        missing = [n for n in self.needed if n not in self.assets]
        if missing:
            raise ValueError(f"{self.manifest}: lacks the asset(s) {', '.join(missing)}")
        self.images = Path(args.images_dir) if args.images_dir else self.dest / "data" / "images"
        self.out = Path(args.out_dir)
        self.download_assets = download_assets

    def asset(self, name: str) -> Path:
        return self.dest / self.assets[name].path

    @property
    def bert_dir(self) -> Path:
        return self.asset("bert_vocab").parent

    def common_model_args(self, arch: bool = True) -> list[str]:
        a = ["--device", self.device]
        if self.args.arch and arch:  # --arch describes the align model, not the baseline
            a += ["--arch", self.args.arch]
        if self.args.num_workers is not None:
            a += ["--num-workers", str(self.args.num_workers)]
        if self.args.batch_size is not None:
            a += ["--batch-size", str(self.args.batch_size)]
        return a

    def arch_input(self) -> dict:
        return {"arch": self.args.arch} if self.args.arch else {}


def step_assets(ctx: Ctx) -> Step:
    da = ctx.download_assets

    def run() -> int:
        argv = ["--dest", str(ctx.dest), "--manifest", ctx.manifest, "--only", *ctx.needed]
        if ctx.args.mirror:
            argv += ["--mirror", ctx.args.mirror]
        if ctx.args.no_progress:
            argv.append("--no-progress")
        return da.main(argv)

    return Step("assets", {}, {}, {}, run)


def _count_images(manifest: Path) -> dict:
    """Counts from download_images' manifest.jsonl: ok, skipped, failed, bad rows."""
    out = {"ok": 0, "skipped": 0, "failed": 0, "bad_rows": 0}
    try:
        with open(manifest, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                st = rec.get("status")
                if st == "failed" and rec.get("error_kind") == "bad_row":
                    out["bad_rows"] += 1
                elif st in out:
                    out[st] += 1
    except OSError:
        pass
    out["present"] = out["ok"] + out["skipped"]
    out["missing"] = out["failed"]
    return out


def step_images(ctx: Ctx, which: str) -> Step:
    import download_images  # noqa: PLC0415
    from utils.data import sniff_format  # noqa: PLC0415

    csv_path = ctx.asset("recall_csv" if which == "recall" else "rank_val_csv")
    out = ctx.images / which
    manifest = out / "manifest.jsonl"

    def limit() -> int:
        spec = ctx.args.max_failures
        if not spec.endswith("%"):
            return int(spec)
        fmt = sniff_format(csv_path)
        total = download_images.estimate_total(str(csv_path), fmt, None, None) or 0
        return int(math.floor(total * float(spec[:-1]) / 100.0))

    def run() -> int:
        n = limit()
        argv = ["--csv", str(csv_path), "--out", str(out), "--workers", str(ctx.args.workers),
                "--max-failures", str(n)]
        if ctx.args.no_progress:
            argv.append("--no-progress")
        rc = download_images.main(argv)
        c = _count_images(manifest)
        if rc == 1:
            say(f"step {which}-images: {c['failed']} of {c['failed'] + c['present']} images could "
                f"not be downloaded, more than --max-failures {ctx.args.max_failures} (= {n}); "
                f"see {manifest}. Rerun to retry them, or raise --max-failures.", error=True)
        elif c["failed"]:
            say(f"step {which}-images: {c['failed']} images could not be downloaded (tolerated, "
                f"<= {n}); the evaluation goes on without them. Details: {manifest}")
        return rc

    return Step(f"{which}-images", {"csv": csv_path}, {"images": out, "manifest": manifest},
                {}, run, lambda: _count_images(manifest))


def step_recall_infer(ctx: Ctx) -> Step:
    out = ctx.out / "recall" / "top10.csv"
    csv_path, images = ctx.asset("recall_csv"), ctx.images / "recall"
    ckpt = ctx.asset("align_weights")

    def run() -> int:
        import recall_infer  # noqa: PLC0415
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--csv", str(csv_path), "--image-dir", str(images), "--checkpoint", str(ckpt),
                "--bert-dir", str(ctx.bert_dir), "--output", str(out), "--topk", "10",
                "--backend", ctx.args.recall_backend, *ctx.common_model_args()]
        if ctx.args.no_progress:
            argv.append("--no-progress")
        return recall_infer.main(argv)

    inputs = {"csv": csv_path, "images": images, "checkpoint": ckpt,
              "bert_vocab": ctx.asset("bert_vocab"), "bert_config": ctx.asset("bert_config"),
              **ctx.arch_input()}
    return Step("recall-infer", inputs, {"top10": out}, {"topk": 10}, run)


def step_recall_eval(ctx: Ctx) -> Step:
    results = ctx.out / "recall" / "top10.csv"
    metrics = ctx.out / "recall" / "metrics.json"
    html = ctx.out / "recall" / "report.html"

    def run() -> int:
        import recall_eval  # noqa: PLC0415
        argv = ["--results", str(results), "--k", "1", "5", "10", "--json", str(metrics)]
        if not ctx.args.no_html:
            argv += ["--html", str(html), "--image-dir", str(ctx.images / "recall")]
        if ctx.args.no_progress:
            argv.append("--no-progress")
        return recall_eval.main(argv)

    outputs = {"metrics": metrics, **({} if ctx.args.no_html else {"report": html})}
    return Step("recall-eval", {"results": results}, outputs, {"k": [1, 5, 10]}, run)


def step_rank_eval(ctx: Ctx) -> Step:
    scores = ctx.out / "rank" / "scores.csv"
    metrics = ctx.out / "rank" / "metrics.json"
    inputs = {"csv": ctx.asset("rank_val_csv"), "images": ctx.images / "rank",
              "checkpoint": ctx.asset("ranker_weights"), "bert_vocab": ctx.asset("bert_vocab"),
              "bert_config": ctx.asset("bert_config"), "poi_pic_num": ctx.asset("poi_pic_num"),
              "poi_image_vectors": ctx.asset("poi_image_vectors"),
              "poi_name_vectors": ctx.asset("poi_name_vectors"), **ctx.arch_input()}

    def run() -> int:
        import rank_eval  # noqa: PLC0415
        argv = ["--csv", str(inputs["csv"]), "--image-dir", str(inputs["images"]),
                "--checkpoint", str(inputs["checkpoint"]), "--bert-dir", str(ctx.bert_dir),
                "--poi-pic-num", str(inputs["poi_pic_num"]),
                "--poi-image-vectors", str(inputs["poi_image_vectors"]),
                "--poi-name-vectors", str(inputs["poi_name_vectors"]),
                "--output", str(scores), "--metrics", str(metrics), *ctx.common_model_args()]
        if ctx.args.no_progress:
            argv.append("--quiet")
        return rank_eval.main(argv)

    return Step("rank-eval", inputs, {"scores": scores, "metrics": metrics}, {}, run)


def step_taiyi_infer(ctx: Ctx) -> Step:
    out = ctx.out / "baseline" / "taiyi_top10.csv"
    inputs = {"csv": ctx.asset("recall_csv"), "images": ctx.images / "recall",
              "text_config": ctx.asset("taiyi_text_config"), "text_vocab": ctx.asset("taiyi_text_vocab"),
              "text_weights": ctx.asset("taiyi_text_finetuned"), "clip_config": ctx.asset("clip_config"),
              "clip_weights": ctx.asset("clip_weights")}

    def run() -> int:
        import recall_infer  # noqa: PLC0415
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--model", "taiyi", "--csv", str(inputs["csv"]), "--image-dir", str(inputs["images"]),
                "--taiyi-text-dir", str(inputs["text_vocab"].parent),
                "--taiyi-text-weights", str(inputs["text_weights"]),
                "--clip-dir", str(inputs["clip_weights"].parent), "--output", str(out), "--topk", "10",
                *ctx.common_model_args(arch=False)]
        if ctx.args.no_progress:
            argv.append("--no-progress")
        return recall_infer.main(argv)

    return Step("taiyi-infer", inputs, {"top10": out}, {"topk": 10, "model": "taiyi"}, run)


def step_taiyi_eval(ctx: Ctx) -> Step:
    results = ctx.out / "baseline" / "taiyi_top10.csv"
    ours = ctx.out / "recall" / "top10.csv"
    metrics = ctx.out / "baseline" / "taiyi_metrics.json"
    compare = ctx.out / "baseline" / "compare.json"

    def run() -> int:
        import recall_eval  # noqa: PLC0415
        rc = recall_eval.main(["--results", str(results), "--k", "1", "5", "10", "--json", str(metrics)])
        if rc == 0:  # paired bootstrap: A = Taiyi, B = ours, so B - A = ours - Taiyi
            rc = recall_eval.main(["--compare", str(results), str(ours), "--k", "1", "5", "10",
                                   "--json", str(compare)])
        return rc

    return Step("taiyi-eval", {"results": results, "ours": ours}, {"metrics": metrics, "compare": compare},
                {"k": [1, 5, 10]}, run)


BUILDERS = {
    "assets": step_assets,
    "recall-images": lambda ctx: step_images(ctx, "recall"),
    "recall-infer": step_recall_infer,
    "recall-eval": step_recall_eval,
    "rank-images": lambda ctx: step_images(ctx, "rank"),
    "rank-eval": step_rank_eval,
    "taiyi-infer": step_taiyi_infer,
    "taiyi-eval": step_taiyi_eval,
}


# ---------------------------------------------------------------------------
# the final table
# ---------------------------------------------------------------------------
def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def results_table(ctx: Ctx) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    notes: dict = {}
    rec = _load(ctx.out / "recall" / "metrics.json")
    if rec:
        for k in ("1", "5", "10"):
            if k in rec.get("recall", {}):
                rows.append({"metric": f"recall@{k}", "ours": rec["recall"][k]})
        if rec.get("mrr") is not None:
            rows.append({"metric": "recall MRR@10", "ours": rec["mrr"]})
        notes["recall POIs"] = rec.get("n_pois")
    rk = _load(ctx.out / "rank" / "metrics.json")
    if rk:
        for key, name in (("accuracy", "ranking accuracy"), ("auc", "ranking ROC-AUC"),
                          ("log_loss", "ranking log loss"), ("baseline", "ranking constant guess")):
            if key in rk:
                rows.append({"metric": name, "ours": rk[key]})
        notes["ranking pairs scored"] = rk.get("pairs_scored")
        notes["ranking pairs with a missing image"] = rk.get("pairs_with_missing_image")
    if ctx.args.with_baselines:
        tai = _load(ctx.out / "baseline" / "taiyi_metrics.json") or {}
        cmp = _load(ctx.out / "baseline" / "compare.json") or {}
        for r in rows:
            k = r["metric"].removeprefix("recall@")
            if r["metric"] == "recall MRR@10":
                tv, diff = tai.get("mrr"), cmp.get("mrr") or {}
            elif r["metric"].startswith("recall@"):
                tv, diff = tai.get("recall", {}).get(k), cmp.get("recall", {}).get(k) or {}
            else:
                continue
            r["taiyi"] = tv
            r["taiyi_paper"] = PAPER_TAIYI.get(r["metric"])
            d = diff.get("B-A") or {}
            r["ours_minus_taiyi"] = d.get("value")
            r["ours_minus_taiyi_ci"] = d.get("ci")
        if tai:
            notes["Taiyi-CLIP POIs"] = tai.get("n_pois")
    for r in rows:
        r["paper"] = PAPER.get(r["metric"])
        r["difference"] = (r["ours"] - r["paper"]
                           if r["paper"] is not None and r["ours"] is not None else None)
    for which in ("recall", "rank"):
        s = read_stamp_summary(ctx.out, f"{which}-images")
        if s:
            notes[f"{which} images present / missing"] = f"{s.get('present')} / {s.get('missing')}"
    return rows, notes


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_table(rows: list[dict]) -> str:
    head = ("metric", "paper", "ours", "difference")
    cells = [[r["metric"], _fmt(r["paper"]), _fmt(r["ours"]),
              "-" if r["difference"] is None else f"{r['difference']:+.4f}"] for r in rows]
    if any("taiyi" in r for r in rows):  # --with-baselines
        head += ("Taiyi-CLIP paper", "Taiyi-CLIP", "ours - Taiyi [95% CI]")
        for c, r in zip(cells, rows):
            d, ci = r.get("ours_minus_taiyi"), r.get("ours_minus_taiyi_ci")
            c += [_fmt(r.get("taiyi_paper")), _fmt(r.get("taiyi")),
                  "-" if d is None else f"{d:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(c) for c in cells])


def write_results(ctx: Ctx, rows, notes) -> dict:
    files = {"recall metrics": ctx.out / "recall" / "metrics.json",
             "recall top-10": ctx.out / "recall" / "top10.csv",
             "recall report": ctx.out / "recall" / "report.html",
             "ranking metrics": ctx.out / "rank" / "metrics.json",
             "ranking scores": ctx.out / "rank" / "scores.csv",
             "Taiyi-CLIP metrics": ctx.out / "baseline" / "taiyi_metrics.json",
             "Taiyi-CLIP vs ours": ctx.out / "baseline" / "compare.json",
             "log": ctx.out / "reproduce.log"}
    files = {k: str(v) for k, v in files.items() if v.exists()}
    doc = {"table": rows, "notes": notes, "files": files,
           "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (ctx.out / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    md = ["# Reproduction results", "", format_table(rows), ""]
    md += [f"- {k}: {v}" for k, v in notes.items()] + [""] + [f"- {k}: `{v}`" for k, v in files.items()]
    (ctx.out / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return files


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def say(msg: str, error: bool = False) -> None:
    print(msg, file=sys.stderr if error else sys.stdout, flush=True)
    (log.error if error else log.info)(msg)


def run_step(step: Step) -> int:
    """Run one step; a SystemExit from inside (a script's argparse or resolve_device)
    becomes its exit status with the message shown."""
    try:
        return int(step.run() or 0)
    except SystemExit as e:
        if isinstance(e.code, str):
            say(f"step {step.name}: {e.code}", error=True)
            return 2
        return int(e.code or 0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(out / "reproduce.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return _main(args)
    except KeyboardInterrupt:
        say("\ninterrupted; finished steps keep their stamps and partial downloads resume: "
            "rerun the same command to go on", error=True)
        return 130
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _main(args) -> int:
    from utils.cli import UserError, resolve_device

    try:
        device = str(resolve_device(args.device))
    except UserError as e:
        say(f"error: {e}", error=True)
        return 2
    try:
        ctx = Ctx(args, device)
    except Exception as e:  # noqa: BLE001 - a bad manifest: AssetError, ValueError
        say(f"error: {e}", error=True)
        return 2
    log.info("reproduce: steps=%s dest=%s images=%s out=%s device=%s mirror=%s", ",".join(args.steps),
             ctx.dest, ctx.images, ctx.out, device, args.mirror)
    t0 = time.monotonic()
    steps = list(args.steps)
    if args.with_baselines and set(STEPS) <= set(steps):
        steps += [s for s in BASELINE_STEPS if s not in steps]
    for name in steps:
        step = BUILDERS[name](ctx)
        forced = name in args.force
        if name == "assets":
            missing = [] if forced else ctx.download_assets.missing_assets(ctx.manifest, ctx.dest,
                                                                           ctx.needed)
            if not forced and not missing:
                say(f"step assets: skipped (all {len(ctx.needed)} assets present and verified in {ctx.dest})")
                continue
            say(f"step assets: running ({len(missing)} of {len(ctx.needed)} assets to fetch)"
                if not forced else "step assets: running (--force)")
        else:
            ok, why = up_to_date(step, ctx.out)
            if ok and not forced:
                say(f"step {name}: skipped ({why}; --force {name} reruns it)")
                continue
            absent = [f"{k} {v}" for k, v in step.inputs.items() if identity(v) is None]
            if absent:
                say(f"step {name}: cannot run, missing input: {'; '.join(absent)} "
                    f"(run the earlier steps first, e.g. reproduce.py --steps "
                    f"{','.join(ALL_STEPS[:ALL_STEPS.index(name)])})", error=True)
                return 1
            say(f"step {name}: running ({'--force' if forced and ok else why})")
        t = time.monotonic()
        before = step.fingerprint() if name != "assets" else None
        rc = run_step(step)
        if rc != 0:
            say(f"step {name}: FAILED (exit status {rc}); see the messages above and "
                f"{ctx.out / 'reproduce.log'}. Fix the cause and rerun: finished steps are skipped.",
                error=True)
            return 1
        if name != "assets":
            write_stamp(step, ctx.out, time.monotonic() - t, step.summary(), before)
        say(f"step {name}: done in {time.monotonic() - t:.1f} s")

    rows, notes = results_table(ctx)
    if rows:
        files = write_results(ctx, rows, notes)
        print()
        print(format_table(rows))
        print()
        for k, v in notes.items():
            print(f"{k}: {v}")
        print(f"results: {ctx.out / 'results.md'} and {ctx.out / 'results.json'}")
        for k, v in files.items():
            print(f"{k}: {v}")
    log.info("reproduce: finished in %.1f s", time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
