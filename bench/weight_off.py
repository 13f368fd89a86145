#!/usr/bin/env python
"""Weight off: what each optimisation of the recall path earns, at full scale. Each is
switched off in turn (a patch applied before ``recall_infer.py`` runs, or a flag) and the
run timed end to end in a fresh process against the run with everything on. An
optimisation earns its lines with a gain of at least 5% (end to end, or of the time to the
first image for a start-up optimisation).

    python bench/weight_off.py --images 5000      # the recall set's size; ~2 MP photos
    python bench/weight_off.py --images 300 --repeat 2 --only simplejpeg lanes
    python bench/weight_off.py --texts --repeat 3  # text batch sizes on the recall set's POI names

Same gallery and model as bench_recall.py (full-size model, random weights, the seed
photos scaled to ~2 MP). The machine's load average is printed: other work slows every
figure, so run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_recall import PeakRSS, prepare  # noqa: E402

# name: (what it is, the patch applied before recall_infer.py runs, extra flags, what counts)
VARIANTS = {
    "simplejpeg": (
        "JPEGs decoded by libjpeg-turbo into a reused buffer (else Pillow)",
        "import utils.formats.images as m; m.simplejpeg = None",
        [],
        "total",
    ),
    "lanes": (
        "ONNX Runtime in one lane per core, each decoding its own batch (else 1 lane x all threads)",
        "import models.engine.encode as e, models.engine.onnx as o; e.default_lanes = o.default_lanes = lambda: 1",
        [],
        "total",
    ),
    "onnx": ("ONNX Runtime as the CPU engine (else torch)", "", ["--backend", "torch"], "total"),
    "batch-4": ("ONNX Runtime batches of 4 on a CPU (else 32)", "", ["--batch-size", "32"], "total"),
}


def run(patch: str, argv: list[str], out: Path, tag: str) -> dict:
    """recall_infer.py in a fresh process with ``patch`` applied first: wall s, first image s, peak RSS."""
    code = (
        f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv = {['recall_infer.py', *argv]!r}\n"
        f"{patch}\nrunpy.run_path({str(ROOT / 'recall_infer.py')!r}, run_name='__main__')"
    )
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    with PeakRSS(proc.pid) as rss:
        rc = proc.wait()
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"recall_infer.py ({tag}) exited {rc}")
    meta = json.loads((out / f"{tag}.csv.meta.json").read_text(encoding="utf-8"))
    return {"total": wall, "first_image": meta["timings_s"].get("first_image", float("nan")), "rss": rss.peak}


def text_batches(seed_data: str, repeat: int, sizes=(16, 32, 64, 256)) -> None:
    """``encode_texts`` on the recall set's distinct POI names, full-size model (random weights), for each
    batch size and one batch of all: best of ``repeat`` seconds and the largest difference from batch 16."""
    import torch

    from models.align import AlignModel, load_tokenizer
    from models.engine import encode_texts
    from utils.args import Encoding
    from utils.formats.rows import iter_recall_csv

    seed = Path(seed_data)
    names = list(dict.fromkeys(r.poi_name for r in iter_recall_csv(seed / "temp_recall_biztype0_fc5_imagern_500.csv")))
    torch.manual_seed(0)
    model, tok = AlignModel.from_bert_dir(seed / "bert-base-chinese").eval(), load_tokenizer(seed / "bert-base-chinese")
    sizes = [*sizes, len(names)]
    best, vecs = dict.fromkeys(sizes, float("inf")), {}
    encode_texts(model, tok, names[:32], Encoding(progress=False))  # warm-up
    for _ in range(repeat):  # sizes alternate: on a shared machine the load moves
        for b in sizes:
            t = time.perf_counter()
            vecs[b] = encode_texts(model, tok, names, Encoding(text_batch_size=b, progress=False))
            best[b] = min(best[b], time.perf_counter() - t)
    print(f"\ntext batches: {len(names)} POI names, best of {repeat}, {torch.get_num_threads()} threads")
    for b in sizes:
        diff = (vecs[b] - vecs[16]).abs().max().item()
        same = torch.equal(vecs[b], vecs[16])
        print(f"  batch {b:>4}: {best[b]:6.2f} s  {best[b] / best[16] - 1:+6.1%}  max |diff| vs 16 {diff:.1e} {same=}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="gallery photos of ~2 MP (default 300; full scale 5000)")
    p.add_argument("--repeat", type=int, default=2, help="rounds; each run's best time is kept (default 2)")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="these optimisations only")
    p.add_argument("--seed-data", default=os.environ.get("AVAS_SEED_DATA", str(ROOT.parent / "shared" / "seed-data")))
    p.add_argument("--workdir", help="keep the generated files here (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    p.add_argument("--texts", action="store_true", help="time the text batch sizes instead (in this process)")
    args = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    if args.texts:
        text_batches(args.seed_data, args.repeat)
        print(f"load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        return 0
    tmp, out, bert_dir, csv_path, _, _, ckpt = prepare(args.seed_data, args.workdir, args.images, "weight_off_")
    base = ["--csv", str(csv_path), "--image-dir", str(out / "images"), "--checkpoint", str(ckpt)]
    base += ["--bert-dir", str(bert_dir), "--no-progress", "--log-level", "WARNING"]

    def argv_of(tag, extra):
        return [*base, "--output", str(out / f"{tag}.csv"), *extra]

    run("", argv_of("export", []), out, "export")  # the ONNX export, once, before any timing
    chosen = args.only or list(VARIANTS)
    best: dict = {}
    for r in range(args.repeat):  # on and off alternate: on a shared machine the load moves
        for name in ["all-on", *chosen]:
            patch, extra = ("", []) if name == "all-on" else VARIANTS[name][1:3]
            print(f"round {r + 1}/{args.repeat}: {name} ...", file=sys.stderr, flush=True)
            got = run(patch, argv_of(name, extra), out, name)
            keep = best.setdefault(name, got)
            best[name] = {k: min(keep[k], got[k]) if k != "rss" else max(keep[k], got[k]) for k in got}
    on = best["all-on"]
    print(f"\nweight off: {args.images} photos of ~2 MP, best of {args.repeat}, {os.cpu_count()} CPUs")
    print(
        f"  all on: {on['total']:.1f} s end to end, first image at {on['first_image']:.2f} s, "
        f"RSS {on['rss'] / 1e9:.2f} GB"
    )
    print(f"  {'switched off':<16} {'total s':>8} {'gain':>7} {'1st img s':>9} {'gain':>7}  verdict  what")
    for name in chosen:
        what, _, _, measure = VARIANTS[name]
        off = best[name]
        gains = {k: off[k] / on[k] - 1 for k in ("total", "first_image")}
        verdict = "earns" if gains[measure] >= 0.05 else "GOES?"
        print(
            f"  {name:<16} {off['total']:8.2f} {gains['total']:+7.1%} {off['first_image']:9.2f} "
            f"{gains['first_image']:+7.1%}  {verdict:<7}  {what} (judged on {measure})"
        )
    print(f"load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(best, indent=1), encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
