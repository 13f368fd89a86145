#!/usr/bin/env python
"""Stage 1 inference: score every POI name against every gallery image (SPEC section 4).

    python recall_infer.py --csv data/temp_recall_biztype0_fc5_imagern_500.csv \\
        --image-dir data/images/recall --checkpoint assets/weights/align_model.pth \\
        --bert-dir assets/bert-base-chinese --output runs/recall/top10.csv
    # the baseline: --model taiyi --taiyi-text-dir DIR --taiyi-text-weights FILE --clip-dir DIR

The gallery is one image per CSV row, <poi_id>_<rank>.<ext> in --image-dir: rows without a
file are left out, unreadable images scored as the zero image as the authors did (both listed
in --missing-list). Outputs are written together, with <output>.meta.json. Exit status: 0
done, 2 bad input (one line, before any encoding), 130 interrupted.
"""

from __future__ import annotations

from utils.cli import entry_point, require

import time

_T0 = time.perf_counter()  # start-up is measured from here (meta timings_s.first_image)

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from models import MODELS, RecallJob, run_recall  # noqa: E402
from utils import args as shared  # noqa: E402
from utils import cli  # noqa: E402

log = logging.getLogger("recall_infer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, help="recall-format CSV (poi_id,poi_name,image_url,rank,...)")
    p.add_argument("--image-dir", required=True, help="directory of <poi_id>_<rank>.<ext> images")
    p.add_argument("--output", required=True, help="top --topk images per POI: poi_id,poi_name,rank,image,score")
    p.add_argument("--full-output", help="also write every (POI, image) score in the authors' format (no header)")
    p.add_argument("--save-embeddings", metavar="FILE.npz", help="also save the vectors (recall_eval.py --embeddings)")
    p.add_argument("--topk", type=cli.positive_int, default=10, help="images kept per POI in --output (default 10)")
    p.add_argument("--skip-missing", action="store_true", help="drop unreadable images instead of the zero image")
    p.add_argument("--missing-list", help="list of missing/unreadable images (default <output>.missing.tsv)")
    shared.add_engine(p)
    shared.add_batches(p)
    shared.add_cache(p)
    shared.add_bad_rows(p)
    shared.add_run(p)
    g = shared.add_recall_files(p, "model (--model NAME and its files)", required=False)
    text = "recall model: " + "; ".join(f"{k} = {e.help}" for k, e in MODELS.items()) + " (default align)"
    g.add_argument("--model", choices=list(MODELS), default="align", help=text)
    for name, help_text in {k: v for e in MODELS.values() for k, v in e.options.items()}.items():
        if name not in ("checkpoint", "bert_dir", "arch"):  # added by add_recall_files
            g.add_argument("--" + name.replace("_", "-"), help=help_text)
    ns = p.parse_args(argv)
    if ns.model == "taiyi":  # an opt-in extra: name it before any work
        require("transformers", "taiyi", "--model taiyi")
    if missing := [k for k in MODELS[ns.model].required if getattr(ns, k) in (None, "")]:
        p.error(f"--model {ns.model} needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return ns


@entry_point
def main(argv=None) -> int:
    ns = parse_args(argv)
    cli.setup_logging(ns.log_level)
    files = {k: getattr(ns, k) for k in MODELS[ns.model].options}  # the chosen model's path options
    job = shared.from_flags(RecallJob, ns, files=files, enc=shared.Encoding.from_args(ns))
    inputs, dirs = {"--csv": job.csv}, {"--image-dir": job.image_dir}  # checked before anything expensive
    for name, path in files.items():
        (dirs if name.endswith("_dir") else inputs)["--" + name.replace("_", "-")] = path
    outputs = {("--output (its .meta.json)" if f == "meta" else f): path for f, path in job.outputs.items()}
    cli.check_files(inputs, dirs, outputs, {"--cache-dir": job.enc.cache_dir})
    meta = run_recall(job, started=_T0)
    t = meta["timings_s"]
    log.info(
        f"done in {time.perf_counter() - _T0:.1f} s since start-up (first image encoded at "
        f"{t.get('first_image', float('nan')):.1f} s; images {t['images']:.1f} s, {meta['images_encoded']} encoded "
        f"/ {meta['images_cached']} cached; engine {meta['image_backend']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
