"""The self-contained HTML reports of recall_eval.py and select_images.py (autoescaped Jinja2
``templates/``): 96 px JPEG thumbnails embedded once each as data URIs, 50 entries a page."""

from __future__ import annotations

import base64
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from utils.formats import poi_of_image

from .bootstrap import fmt_figure

log = logging.getLogger(__name__)
THUMB_PX = 96
PAGE_SIZE = 50


def embed_thumbnails(keys: list, file_of=lambda k: k, progress: bool = True) -> tuple[dict, dict]:
    """``(tid, thumbs)``: the thumbnail id of each key whose file ``file_of(key)`` reads, its URI."""

    def thumb(key) -> str | None:
        if not (path := file_of(key)):
            return None
        try:
            with Image.open(path) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
                im = im.convert("RGB")
                im.thumbnail((THUMB_PX, THUMB_PX), Image.BILINEAR)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=75)
        except Exception as e:
            log.warning("no thumbnail for %s (%s: %s)", path, type(e).__name__, e)
            return None
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    with ThreadPoolExecutor(4) as ex:
        uris = list(tqdm(ex.map(thumb, keys), total=len(keys), desc="thumbnails", disable=not progress, leave=False))
    readable = [(k, uri) for k, uri in zip(keys, uris) if uri is not None]
    return {k: f"t{i}" for i, (k, _) in enumerate(readable)}, {f"t{i}": uri for i, (_, uri) in enumerate(readable)}


def render(template: str, entries: list, page_size: int, thumbs: dict, **context) -> str:
    """``templates/<template>`` with ``entries`` cut into pages of ``page_size``."""
    import jinja2

    loader = jinja2.FileSystemLoader(Path(__file__).resolve().with_name("templates"))
    layout = {"trim_blocks": True, "lstrip_blocks": True}
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined, **layout)
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":")}  # thumbnails in their order, compact
    return env.get_template(template).render(entries=entries, page_size=page_size, thumbs=thumbs, **context) + "\n"


def recall_report(doc: dict, result, k: int, image_dir, page_size=PAGE_SIZE, progress=True) -> str:
    """Each POI of recall_eval's ``doc`` with its top ``k`` images (found as listed, beside the results
    file, or by name in ``image_dir``), misses first."""

    def find(image: str) -> str | None:
        cands = [Path(image), Path(doc["results"]).parent / image]
        cands += [Path(image_dir) / Path(image).name] if image_dir else []
        return next((str(c) for c in cands if c.is_file()), None)

    pois = sorted(result.pois, key=lambda p: p.hit_at(k))  # stable: misses first, then hits, in input order
    images = list(dict.fromkeys(img for p in pois for img, _ in p.top[:k]))
    tid, thumbs = embed_thumbnails(images, find, progress)
    if len(thumbs) < len(images):
        hint = "" if image_dir else " (pass --image-dir)"
        log.warning("%d listed images had no readable file for a thumbnail%s", len(images) - len(thumbs), hint)
    summary = {"results": Path(doc["results"]).name, "POIs": len(pois)}
    for j in doc["ks"]:
        summary[f"recall@{j}"] = fmt_figure(doc["recall"][str(j)], doc.get("recall_ci", {}).get(str(j)))
    summary["MRR"] = f"{doc['mrr']:.4f}"
    summary[f"misses at {k}"] = f"{sum(not p.hit_at(k) for p in pois)} of {len(pois)} (shown first)"
    context = dict(title=f"Recall top {k}", summary=summary, k=k, tid=tid, owner=poi_of_image)
    return render("recall.html.j2", pois, page_size, thumbs, basename=os.path.basename, **context)


def selection_report(items: list, summary: dict, title: str, progress=True) -> tuple[str, dict]:
    """``(html, info)``: each item with its candidates in final order, items without a selection first."""
    from utils.selection import DUPLICATE, OK, UNREADABLE

    shown = sorted(items, key=lambda it: it.selected is not None)  # stable: no selection first
    keep = (OK, DUPLICATE, UNREADABLE)
    files = list(dict.fromkeys(c.file for it in shown for c in it.cands if c.file and c.status in keep))
    tid, thumbs = embed_thumbnails(files, progress=progress)
    status_css = {OK: "", DUPLICATE: "dup"}  # any other status: "bad"

    def figures(it):
        for c in sorted(it.cands, key=lambda c: (c.final_rank is None, c.final_rank or 0)):
            css = "sel" if c.selected else "short" if c.ranker_score is not None else status_css.get(c.status, "bad")
            t = tid.get(c.file) if c.status != UNREADABLE else None
            yield c, css, os.path.basename(c.image.split("?", 1)[0]) or c.image, t

    text = render("selection.html.j2", shown, PAGE_SIZE, thumbs, title=title, summary=summary, figures=figures)
    return text, {"thumbnails": len(thumbs), "missing": len(files) - len(thumbs), "bytes": len(text.encode("utf-8"))}
