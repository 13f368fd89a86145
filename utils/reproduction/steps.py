"""reproduce.py's steps (``Step``, ``run_step``) and the table of the paper's figures beside
ours (``results_table``). A step is done when its outputs exist and its stamp holds its
arguments and each input's size, mtime and sha256 (of an image folder: its manifest.jsonl);
the sha256 is taken again only when size or mtime moved."""

from __future__ import annotations

from utils.cli import UserError, one_line

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

from utils.hashing import sha256_file
from utils.io import atomic_write, write_json

log = logging.getLogger("reproduce")

IMAGE_MANIFEST = "manifest.jsonl"  # what download_images writes in its folder, one line per image
ROWS = {f"recall@{k}": f"recall/{k}" for k in (1, 5, 10)} | {  # table row -> its key in its step's metrics JSON
    "recall MRR@10": "mrr",
    "ranking accuracy": "accuracy",
    "ranking ROC-AUC": "auc",
    "ranking log loss": "log_loss",
    "ranking constant guess": "baseline",
}
PAPER = {"recall@5": 0.788, "ranking accuracy": 0.652}
PAPER_TAIYI: dict = {}  # the paper's Taiyi-CLIP figures: not published in a form found so far


def _load(path) -> dict:
    """A JSON object, {} when absent or unreadable; NaN becomes None (shown as "-")."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=lambda c: None)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


# --- stamps ----------------------------------------------------------------------------------
def input_record(path, old: dict) -> dict:
    """Size, mtime and sha256 of the file ``path`` (a folder: its manifest.jsonl; {} when
    there is none); the sha256 of ``old`` is kept while size and mtime match it."""
    p = Path(path) / IMAGE_MANIFEST if Path(path).is_dir() else Path(path)
    if not p.is_file():
        return {}
    st = p.stat()
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    same = "sha256" in old and all(old.get(k) == v for k, v in rec.items())
    return rec | {"sha256": old["sha256"] if same else sha256_file(p)}


def check_stamp(stamp: Path, args: dict, inputs: dict, outputs) -> tuple[str | None, dict]:
    """``(why, records)``: why the step must run (None: done) and its ``inputs``' records for its
    next stamp. A done step whose inputs were only touched gets its records refreshed."""
    doc = _load(stamp)
    old = doc.get("inputs") or {}
    records = {name: input_record(p, old.get(name) or {}) for name, p in inputs.items()}
    changed = [name for name, r in records.items() if r.get("sha256") != (old.get(name) or {}).get("sha256")]
    gone = [str(p) for p in outputs if not Path(p).exists()]
    why = None
    if not doc:
        why = "not done"
    elif "inputs" not in doc:
        why = "its stamp has no input records (older version)"
    elif doc.get("args") != json.loads(json.dumps(args)):
        why = "arguments changed"
    elif changed:
        why = f"input changed: {changed[0]}"
    elif gone:
        why = f"output missing: {gone[0]}"
    elif records != old:
        write_json(stamp, {**doc, "inputs": records})
    return why, records


@dataclass(frozen=True)
class Step:
    """``call(how, **args)`` reads ``inputs`` and writes ``outputs``, returning None or why it
    failed. ``args`` shape the outputs (stamped); ``how`` (device, workers ...) does not."""

    name: str
    call: Callable[..., str | None]
    args: dict
    inputs: dict
    outputs: list


def say(msg: str, error: bool = False) -> None:
    print(msg, file=sys.stderr if error else sys.stdout, flush=True)
    (log.error if error else log.info)(msg)


def run_step(step: Step, how, out: Path, forced: bool, earlier: str) -> bool:
    """Run ``step`` unless done; False when it failed or cannot run (``earlier``: the steps
    that make its inputs)."""
    stamp = out / "steps" / f"{step.name}.done.json"
    why, records = check_stamp(stamp, step.args, step.inputs, step.outputs)
    why = "--force" if forced else why
    if why is None:
        say(f"step {step.name}: skipped (done; --force {step.name} reruns it)")
        return True
    if absent := [f"{k} {v}" for k, v in step.inputs.items() if not Path(v).exists()]:
        hint = f"(run the earlier steps first, e.g. reproduce.py --steps {earlier})"
        say(f"step {step.name}: cannot run, missing input: {'; '.join(absent)} {hint}", error=True)
        return False
    say(f"step {step.name}: running ({why})")
    stamp.unlink(missing_ok=True)  # not done until it finishes
    t = time.monotonic()
    try:
        failed, status = step.call(how, **step.args), 1
    except UserError as e:  # bad input met inside the step: what its script exits 2 for
        failed, status = f"error: {one_line(e)}", 2
    if failed:
        say(f"step {step.name}: {failed}", error=True)
        more = f"see the messages above and {out}/reproduce.log. Fix the cause and rerun: finished steps are skipped."
        say(f"step {step.name}: FAILED (exit status {status}); {more}", error=True)
        return False
    write_json(stamp, {"step": step.name, "args": step.args, "inputs": records})
    say(f"step {step.name}: done in {time.monotonic() - t:.1f} s")
    return True


# --- the table -------------------------------------------------------------------------------
def table_rows(rec: dict, rank: dict, taiyi: dict | None, compare: dict) -> list[dict]:
    """One row per figure we have: metric, paper, ours, difference (+ Taiyi-CLIP on recall rows)."""
    dig = lambda d, key: reduce(lambda x, k: (x or {}).get(k), key.split("/"), d)  # "a/b" -> d["a"]["b"]
    rows = []
    for metric, key in ROWS.items():
        recall = metric.startswith("recall")
        if (ours := dig(rec if recall else rank, key)) is None:
            continue
        diff = ours - PAPER[metric] if metric in PAPER else None
        rows.append({"metric": metric, "paper": PAPER.get(metric), "ours": ours, "difference": diff})
        if taiyi is not None and recall:
            d = dig(compare, key + "/B-A") or {}
            rows[-1] |= {"taiyi_paper": PAPER_TAIYI.get(metric), "taiyi": dig(taiyi, key)}
            rows[-1] |= {"ours_minus_taiyi": d.get("value"), "ours_minus_taiyi_ci": d.get("ci")}
    return rows


def format_table(rows: list[dict]) -> str:
    fmt = lambda v, sign="": "-" if v is None else f"{v:{sign}.4f}"
    head = ["metric", "paper", "ours", "difference"]
    cells = [[r["metric"], fmt(r["paper"]), fmt(r["ours"]), fmt(r["difference"], "+")] for r in rows]
    if any("taiyi" in r for r in rows):  # --with-baselines
        head += ["Taiyi-CLIP paper", "Taiyi-CLIP", "ours - Taiyi [95% CI]"]
        for c, r in zip(cells, rows):
            d, ci = r.get("ours_minus_taiyi"), r.get("ours_minus_taiyi_ci")
            ci_text = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and d is not None else ""
            c += [fmt(r.get("taiyi_paper")), fmt(r.get("taiyi")), fmt(d, "+") + ci_text]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def results_table(out_dir, images_dir, with_baselines: bool) -> str | None:
    """The table and its notes, also written to ``out_dir/results.{md,json}``; None without figures."""
    out = Path(out_dir)
    rec, rank = _load(out / "recall" / "metrics.json"), _load(out / "rank" / "metrics.json")
    taiyi = _load(out / "baseline" / "taiyi_metrics.json") if with_baselines else None
    rows = table_rows(rec, rank, taiyi, _load(out / "baseline" / "compare.json"))
    notes = {
        "recall POIs": rec.get("n_pois"),
        "ranking pairs scored": rank.get("pairs_scored"),
        "ranking pairs with a missing image": rank.get("pairs_with_missing_image"),
        "Taiyi-CLIP POIs": (taiyi or {}).get("n_pois"),
    }
    for w in ("recall", "rank"):
        if (manifest := Path(images_dir, w, IMAGE_MANIFEST)).is_file():  # missing: bad CSV rows too
            lines = manifest.read_text(encoding="utf-8").splitlines()
            c = Counter(json.loads(line).get("status") for line in lines if line.endswith("}"))
            notes[f"{w} images present / missing"] = f"{c['ok'] + c['skipped']} / {c['failed']}"
    notes = {k: v for k, v in notes.items() if v is not None}
    if not rows:
        return None
    text = "\n".join([format_table(rows), "", *(f"- {k}: {v}" for k, v in notes.items())])
    write_json(out / "results.json", {"table": rows, "notes": notes, "written": time.strftime("%FT%T")})
    with atomic_write(out / "results.md") as f:
        f.write(f"# Reproduction results\n\n{text}\n")
    return f"{text}\n- results: {out / 'results.md'} and {out / 'results.json'}"
