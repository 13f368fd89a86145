#!/usr/bin/env python
"""Reproduce the paper's two figures with one command: recall@5 (0.788) and the ranking
pairwise accuracy (0.652). Steps: assets, recall-images, recall-infer, recall-eval,
rank-images, rank-eval (+ taiyi-infer, taiyi-eval with --with-baselines).

Each step runs a script's ``main(argv)`` (see plan()); it is done when its outputs exist and
OUT/steps/STEP.done.json holds the arguments it ran with (a changed one reruns it; how it runs
does not count: device, backend, batch size, workers, progress). The stamp goes when the step
starts, so an interrupted step reruns. After changing an input by hand: --force STEP.
Exit status: 0 done, 1 a step failed (named), 2 bad arguments or paths, 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from utils import args, cli
from utils.io import atomic_write, exclusive_lock, write_json

ROOT = Path(__file__).resolve().parent
STEPS = ("assets", "recall-images", "recall-infer", "recall-eval", "rank-images", "rank-eval")
BASELINE_STEPS = ("taiyi-infer", "taiyi-eval")
ALL_STEPS = STEPS + BASELINE_STEPS
MODEL_STEPS, IMAGE_STEPS = ("recall-infer", "rank-eval", "taiyi-infer"), ("recall-images", "rank-images")
NEEDED_ASSETS = (
    "recall_csv",
    "rank_val_csv",
    "poi_pic_num",
    "poi_image_vectors",
    "poi_name_vectors",
    "align_weights",
    "ranker_weights",
    "bert_vocab",
    "bert_config",
)
BASELINE_ASSETS = (
    "taiyi_text_config",
    "taiyi_text_vocab",
    "taiyi_text_tokenizer_config",
    "taiyi_text_special_tokens",
    "taiyi_text_finetuned",
    "clip_config",
    "clip_preprocessor_config",
    "clip_weights",
)
INPUT_FLAGS = {
    "--csv",
    "--image-dir",
    "--checkpoint",
    "--bert-dir",
    "--arch",
    "--results",
    "--compare",
    "--taiyi-text-dir",
    "--taiyi-text-weights",
    "--clip-dir",
    "--poi-pic-num",
    "--poi-image-vectors",
    "--poi-name-vectors",
}
OUTPUT_FLAGS = {"--out", "--output", "--json", "--metrics", "--html"}
BACKENDS = ("auto", "torch", "onnx")
ROWS = {
    "recall@1": "recall/1",
    "recall@5": "recall/5",
    "recall@10": "recall/10",
    "recall MRR@10": "mrr",
    "ranking accuracy": "accuracy",
    "ranking ROC-AUC": "auc",
    "ranking log loss": "log_loss",
    "ranking constant guess": "baseline",
}  # table row -> its key in the metrics JSON of its step
PAPER = {"recall@5": 0.788, "ranking accuracy": 0.652}
PAPER_TAIYI: dict = {}  # the paper's Taiyi-CLIP figures: not published in a form found so far
SCRIPTS = {  # step -> the script calls that make its outputs ({*x}: options that may be absent)
    "assets": ["download_assets --dest {dest} --manifest {manifest} --only {*needed} {*mirror}"],
    "recall-images": ["download_images --csv {recall_csv} --out {img}/recall"],
    "recall-infer": [
        "recall_infer --csv {recall_csv} --image-dir {img}/recall --checkpoint {align_weights} "
        "--bert-dir {bert} --output {o}/recall/top10.csv --topk 10 {*arch}"
    ],
    "recall-eval": ["recall_eval --results {o}/recall/top10.csv --k 1 5 10 --json {o}/recall/metrics.json {*html}"],
    "rank-images": ["download_images --csv {rank_val_csv} --out {img}/rank"],
    "rank-eval": [
        "rank_eval --csv {rank_val_csv} --image-dir {img}/rank --checkpoint {ranker_weights} "
        "--bert-dir {bert} --poi-pic-num {poi_pic_num} --poi-image-vectors {poi_image_vectors} "
        "--poi-name-vectors {poi_name_vectors} --output {o}/rank/scores.csv "
        "--metrics {o}/rank/metrics.json {*arch}"
    ],
    "taiyi-infer": [
        "recall_infer --model taiyi --csv {recall_csv} --image-dir {img}/recall --taiyi-text-dir "
        "{taiyi} --taiyi-text-weights {taiyi_text_finetuned} --clip-dir {clip} "
        "--output {o}/baseline/taiyi_top10.csv --topk 10"
    ],
    "taiyi-eval": [  # and the paired bootstrap: A = Taiyi, B = ours, so B - A = ours - Taiyi
        "recall_eval --results {o}/baseline/taiyi_top10.csv --k 1 5 10 --json {o}/baseline/taiyi_metrics.json",
        "recall_eval --compare {o}/baseline/taiyi_top10.csv {o}/recall/top10.csv --k 1 5 10 "
        "--json {o}/baseline/compare.json",
    ],
}
log = logging.getLogger("reproduce")


def build_parser() -> argparse.ArgumentParser:
    def steps(text: str, all_steps=STEPS) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        if set(names) - set(ALL_STEPS) - {"all"}:
            raise argparse.ArgumentTypeError(f"unknown step(s) in {text!r}; steps: {', '.join(ALL_STEPS)}")
        return list(all_steps) if names == ["all"] else [s for s in ALL_STEPS if s in names]  # pipeline order

    def error(message):  # one line and exit 2, through cli.entry_point
        raise cli.UserError(f"{message} (see --help)")

    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n\n")[0])
    p.error, add = error, p.add_argument
    add("--steps", type=steps, default="all", help="steps to run, comma-separated (default: all)")
    add(
        "--force",
        type=functools.partial(steps, all_steps=ALL_STEPS),
        default="",
        metavar="STEPS",
        help="rerun these steps even when done, or all",
    )
    add("--dest", default=str(ROOT), help="assets go to DEST/data/ and DEST/assets/ (default: here)")
    add("--mirror", metavar="BASE_URL", help="fetch every asset from BASE_URL/<manifest path>")
    add("--manifest", help="asset manifest (default: the project's assets.json)")
    add("--images-dir", help="image folders IMAGES/recall and IMAGES/rank (default: DEST/data/images)")
    add(
        "--out-dir",
        default=str(ROOT / "runs" / "reproduce"),
        help="figures, reports, step stamps and the log (default: runs/reproduce)",
    )
    add("--workers", type=cli.positive_int, default=16, help="concurrent image downloads (default: 16)")
    add("--num-workers", type=cli.non_negative_int, help="image decoding processes of the model steps")
    add("--batch-size", type=cli.positive_int, help="images per batch in the model steps")
    add(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image-encoding engine of every model step "
        "(default auto: ONNX Runtime on a CPU when it agrees with torch); figures do not depend on it",
    )
    add(
        "--recall-backend",
        dest="backend",
        choices=BACKENDS,
        default=argparse.SUPPRESS,
        help="deprecated alias of --backend",
    )
    add("--arch", metavar="FILE.json", help="architecture of a non-default model, for both model steps")
    add(
        "--max-failures",
        type=cli.count_or_percent,
        default="20%",
        help="image downloads allowed to fail per set: N or P%% of it (default: 20%%)",
    )
    add("--with-baselines", action="store_true", help="also the Taiyi-CLIP recall baseline")
    add("--no-html", action="store_true", help="no HTML report in recall-eval")
    args.add_device(p)
    args.add_run(p)
    return p


def say(msg: str, error: bool = False) -> None:
    print(msg, file=sys.stderr if error else sys.stdout, flush=True)
    (log.error if error else log.info)(msg)


def _load(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=lambda c: None)  # NaN: "-"
    except (OSError, ValueError):
        return {}


@dataclass
class Step:
    """``calls``: [module, *argv] whose arguments shape the outputs (the stamp records them; inputs
    and outputs are read off their path flags); ``extra``: how it runs, not recorded."""

    name: str
    calls: list
    extra: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def __post_init__(self):
        pairs = [(f, v) for _, *argv in self.calls for f, v in zip(argv, argv[1:])]
        self.inputs = {f[2:]: v for f, v in pairs if f in INPUT_FLAGS}
        self.outputs = self.outputs or [v for f, v in pairs if f in OUTPUT_FLAGS]

    def stamp(self, out) -> Path:
        return Path(out, "steps", f"{self.name}.done.json")

    def why_run(self, out) -> str | None:
        """None when done, else the reason to run."""
        calls = _load(self.stamp(out)).get("calls")
        gone = [str(p) for p in self.outputs if not Path(p).exists()]
        return (
            "not done"
            if calls is None
            else "arguments changed"
            if calls != self.calls
            else f"output missing: {gone[0]}"
            if gone
            else None
        )

    def run(self) -> int:
        """The scripts' ``main(argv)`` in this process, in turn; the first failing exit status."""
        for module, *argv in self.calls:
            try:
                rc = int(importlib.import_module(module).main(argv + self.extra) or 0)
            except SystemExit as e:  # the script's argparse (it said why)
                rc = e.code if isinstance(e.code, int) else 2
            if rc:
                return rc
        return 0


def image_counts(manifest: Path) -> dict:
    """Images present / missing (bad CSV rows included) per download_images' manifest.jsonl."""
    lines = manifest.read_text(encoding="utf-8").splitlines() if manifest.is_file() else []
    c = Counter(json.loads(line).get("status") for line in lines if line.endswith("}"))
    return {"present": c["ok"] + c["skipped"], "missing": c["failed"]}


def plan(args, manifest: str, assets: dict) -> dict[str, Step]:
    """The steps to run: SCRIPTS with this run's paths and options, and how each runs."""
    needed = NEEDED_ASSETS + BASELINE_ASSETS * args.with_baselines
    p = {name: str(Path(args.dest, path)) for name, path in assets.items()}
    p |= {"dest": args.dest, "manifest": manifest, "o": args.out_dir, "img": args.images_dir}
    p |= {
        k: str(Path(p.get(n, ".")).parent)
        for k, n in (("bert", "bert_vocab"), ("clip", "clip_weights"), ("taiyi", "taiyi_text_vocab"))
    }
    fill = (
        lambda line: [
            x
            for t in line.split()  # noqa: E731 - split first: paths may hold spaces
            for x in (p[t[1:-1]] if t.startswith("{*") else [t.format(**p)])
        ]
    )
    p |= {
        "*needed": list(needed),
        "*arch": ["--arch", args.arch] if args.arch else [],
        "*mirror": ["--mirror", args.mirror] if args.mirror else [],
        "*html": [] if args.no_html else fill("--html {o}/recall/report.html --image-dir {img}/recall"),
    }
    progress = ["--no-progress"] if args.no_progress else []
    model = [
        "--device",
        args.device,
        "--backend",
        args.backend,
        *progress,
        *(["--num-workers", str(args.num_workers)] if args.num_workers is not None else []),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
    ]
    how = {
        **dict.fromkeys(MODEL_STEPS, model),
        **dict.fromkeys(IMAGE_STEPS, ["--workers", str(args.workers), "--max-failures", args.max_failures, *progress]),
    }
    steps = {}
    for name in args.steps:
        calls = [fill(line) for line in SCRIPTS[name]]  # check_args made sure the manifest has their assets
        extra = how.get(name, progress)
        steps[name] = Step(name, calls, extra, [p[n] for n in needed] if name == "assets" else [])
    return steps


def report(args) -> None:
    """The table metric / paper / ours / difference (+ Taiyi-CLIP with --with-baselines) and its
    notes, from the steps' metrics: on stdout and in OUT/results.md and OUT/results.json."""
    rec, rk, tai, cmp = (
        _load(f"{args.out_dir}/{f}.json")
        for f in ("recall/metrics", "rank/metrics", "baseline/taiyi_metrics", "baseline/compare")
    )
    dig = lambda d, key: functools.reduce(lambda x, k: (x or {}).get(k), key.split("/"), d)  # noqa: E731 "a/b"
    rows = []
    for metric, key in ROWS.items():
        recall = metric.startswith("recall")
        if (ours := dig(rec if recall else rk, key)) is None:
            continue
        rows.append(
            {
                "metric": metric,
                "paper": PAPER.get(metric),
                "ours": ours,
                "difference": ours - PAPER[metric] if metric in PAPER else None,
            }
        )
        if args.with_baselines and recall:
            d = dig(cmp, key + "/B-A") or {}
            rows[-1].update(
                taiyi_paper=PAPER_TAIYI.get(metric),
                taiyi=dig(tai, key),
                ours_minus_taiyi=d.get("value"),
                ours_minus_taiyi_ci=d.get("ci"),
            )
    notes = {
        "recall POIs": rec.get("n_pois"),
        "ranking pairs scored": rk.get("pairs_scored"),
        "ranking pairs with a missing image": rk.get("pairs_with_missing_image"),
        "Taiyi-CLIP POIs": tai.get("n_pois") if args.with_baselines else None,
    }
    for w in ("recall", "rank"):
        if Path(args.images_dir, w, "manifest.jsonl").is_file():
            c = image_counts(Path(args.images_dir, w, "manifest.jsonl"))
            notes[f"{w} images present / missing"] = f"{c['present']} / {c['missing']}"
    notes, out = {k: v for k, v in notes.items() if v is not None}, Path(args.out_dir)
    if rows:
        text = "\n".join([format_table(rows), "", *(f"- {k}: {v}" for k, v in notes.items())])
        write_json(out / "results.json", {"table": rows, "notes": notes, "written": time.strftime("%FT%T")})
        with atomic_write(out / "results.md") as f:
            f.write(f"# Reproduction results\n\n{text}\n")
        print(f"\n{text}\n- results: {out / 'results.md'} and {out / 'results.json'}")


def format_table(rows: list[dict]) -> str:
    fmt = lambda v, sign="": "-" if v is None else f"{v:{sign}.4f}"  # noqa: E731
    head = ["metric", "paper", "ours", "difference"]
    cells = [[r["metric"], fmt(r["paper"]), fmt(r["ours"]), fmt(r["difference"], "+")] for r in rows]
    if any("taiyi" in r for r in rows):  # --with-baselines
        head += ["Taiyi-CLIP paper", "Taiyi-CLIP", "ours - Taiyi [95% CI]"]
        for c, r in zip(cells, rows):
            d, ci = r.get("ours_minus_taiyi"), r.get("ours_minus_taiyi_ci")
            c += [
                fmt(r.get("taiyi_paper")),
                fmt(r.get("taiyi")),
                fmt(d, "+") + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and d is not None else ""),
            ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def check_args(args) -> tuple[str, dict]:
    """What a user can get wrong, before any work: (manifest, its asset name -> path)."""
    from utils.fetch import DEFAULT_MANIFEST, AssetError, load_manifest  # noqa: PLC0415

    manifest = str(cli.input_file(args.manifest, "--manifest") if args.manifest else DEFAULT_MANIFEST)
    try:
        assets = {a.name: a.path for a in load_manifest(manifest)}
    except AssetError as e:
        raise cli.UserError(str(e)) from None
    args.with_baselines = args.with_baselines or bool(set(args.steps) & set(BASELINE_STEPS))
    if args.with_baselines and set(STEPS) <= set(args.steps):
        args.steps = list(dict.fromkeys(args.steps + list(BASELINE_STEPS)))
    lacking = [n for n in NEEDED_ASSETS + BASELINE_ASSETS * args.with_baselines if n not in assets]
    if lacking:
        raise cli.UserError(f"{manifest}: lacks the asset(s) {', '.join(lacking)}")
    if args.arch:
        cli.input_file(args.arch, "--arch")
    cli.output_dir(args.out_dir, "--out-dir")
    if "assets" in args.steps:
        cli.output_dir(args.dest, "--dest")
    args.images_dir = args.images_dir or str(Path(args.dest, "data", "images"))
    for w in ("recall", "rank"):
        if f"{w}-images" in args.steps:
            cli.output_dir(Path(args.images_dir, w), "--images-dir")
    if set(MODEL_STEPS) & set(args.steps):
        cli.resolve_device(args.device)  # --device cuda without a GPU: exit 2 now, not in a step
    return manifest, assets


@cli.entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    steps, out = plan(args, *check_args(args)), Path(args.out_dir)
    with exclusive_lock(out, ".reproduce.lock"):
        handler = logging.FileHandler(out / "reproduce.log", encoding="utf-8")  # the steps' messages too
        handler.setFormatter(logging.Formatter(cli.LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        cli.setup_logging(args.log_level)
        try:
            log.info("reproduce: %s", vars(args))
            for name in args.steps:
                if (rc := run_step(steps[name], out, name in args.force)) != 0:
                    return rc
            report(args)
            return 0
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


def run_step(step: Step, out: Path, forced: bool) -> int:
    """0 when the step is done or ran well, 1 when it failed or cannot run, 130 when interrupted."""
    why = "--force" if forced else step.why_run(out)
    if why is None:
        say(f"step {step.name}: skipped (done; --force {step.name} reruns it)")
        return 0
    absent = [f"{k} {v}" for k, v in step.inputs.items() if not Path(v).exists()]
    if absent:
        say(
            f"step {step.name}: cannot run, missing input: {'; '.join(absent)} (run the earlier steps "
            f"first, e.g. reproduce.py --steps {','.join(ALL_STEPS[: ALL_STEPS.index(step.name)])})",
            error=True,
        )
        return 1
    say(f"step {step.name}: running ({why})")
    step.stamp(out).unlink(missing_ok=True)  # not done until it finishes
    t = time.monotonic()
    try:
        rc = step.run()
    except cli.UserError as e:  # bad input met inside the step (a script not under cli.entry_point)
        say(f"step {step.name}: error: {cli.one_line(e)}", error=True)
        rc = 2
    if rc == cli.EXIT_INTERRUPTED:  # Ctrl-C, said in one line by the step script's cli.entry_point
        return rc
    if rc != 0:
        say(
            f"step {step.name}: FAILED (exit status {rc}); see the messages above and {out}/reproduce.log. "
            f"Fix the cause and rerun: finished steps are skipped.",
            error=True,
        )
        return 1
    write_json(step.stamp(out), {"step": step.name, "calls": step.calls})
    say(f"step {step.name}: done in {time.monotonic() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
