"""The self-contained HTML reports (Jinja2 templates beside this file, autoescaped: every
user string is escaped): the recall report of recall_eval.py and the selection page of
select_images.py, on one skeleton (``templates/page.html.j2``). Thumbnails (~96 px JPEGs)
are embedded once each as data URIs, 50 entries a page, so 500 POIs x 10 images stay
light."""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from utils.formats import poi_of_image

log = logging.getLogger(__name__)
THUMB_PX = 96


def thumbnail_data_uri(path: str | os.PathLike, size: int = THUMB_PX, quality: int = 75) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail fitting ``size`` px, or None when the
    file cannot be read."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size * 2, size * 2))
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
    except Exception as e:
        log.warning("no thumbnail for %s (%s: %s)", path, type(e).__name__, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def embed_thumbnails(keys: Iterable, file_of: Callable = lambda k: k, workers: int = 4, progress: bool = True):
    """``(tid, thumbs)``: ``tid[key]`` the id of the thumbnail of the file ``file_of(key)``
    (None: no file; keys without a readable image are left out), ``thumbs[id]`` its data
    URI; made in ``workers`` threads."""
    keys = list(keys)

    def thumb(k):
        f = file_of(k)
        return thumbnail_data_uri(f) if f else None

    with ThreadPoolExecutor(max(1, workers)) as ex:
        uris = list(tqdm(ex.map(thumb, keys), total=len(keys), desc="thumbnails", disable=not progress, leave=False))
    tid, thumbs = {}, {}
    for k, uri in zip(keys, uris):
        if uri is not None:
            tid[k] = f"t{len(thumbs)}"
            thumbs[tid[k]] = uri
    return tid, thumbs


@cache
def _templates():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).resolve().with_name("templates")),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":")}  # thumbnails in their order, compact
    return env


def render(template: str, entries: list, page_size: int, thumbs: dict, **context) -> str:
    """``templates/<template>`` with ``entries`` cut into pages of ``page_size``."""
    pages = [
        (f"{a + 1}-{a + len(entries[a : a + page_size])}", entries[a : a + page_size])
        for a in range(0, len(entries), page_size)
    ]
    return _templates().get_template(template).render(pages=pages, thumbs=thumbs, **context) + "\n"


def recall_report(result, k: int, resolve: Callable, title: str, summary: dict, page_size=50, workers=4, progress=True):
    """``(html, info)``: the recall report of a ``RecallResult``, each POI with its top
    ``k`` images (``resolve(image) -> file or None`` finds them), misses first."""
    pois = sorted(result.pois, key=lambda p: p.hit_at(k))  # stable: misses first, then hits, in input order
    images = list(dict.fromkeys(img for p in pois for img, _ in p.top[:k]))
    tid, thumbs = embed_thumbnails(images, resolve, workers, progress)
    misses = sum(not p.hit_at(k) for p in pois)
    summary = {**summary, f"misses at {k}": f"{misses} of {len(pois)} (shown first)"}
    context = dict(title=title, summary=summary, k=k, tid=tid, owner=poi_of_image, basename=os.path.basename)
    text = render("recall.html.j2", pois, page_size, thumbs, **context)
    return text, _info(text, len(thumbs), len(images) - len(thumbs))


def _info(text: str, thumbs: int, missing: int) -> dict:
    return {"thumbnails": thumbs, "missing": missing, "bytes": len(text.encode("utf-8"))}


def selection_report(items: list, summary=None, title="Image selection", page_size=50, workers=4, progress=True):
    """``(html, info)``: the selection page of ``utils.selection`` items, each with its
    candidates in final order (the selected one framed green, those the ranker scored
    outlined, the ones not scored faded at the end), items without a selection first."""
    from utils.selection import DUPLICATE, OK, UNREADABLE

    shown = sorted(items, key=lambda it: it.selected is not None)  # stable: no selection first
    keep = (OK, DUPLICATE, UNREADABLE)
    files = list(dict.fromkeys(c.file for it in shown for c in it.cands if c.file and c.status in keep))
    tid, thumbs = embed_thumbnails(files, workers=workers, progress=progress)

    def figures(it):
        ranked = sorted((c for c in it.cands if c.final_rank is not None), key=lambda c: c.final_rank)
        for c in ranked + [c for c in it.cands if c.final_rank is None]:
            css = (
                "sel" if c.selected
                else "short" if c.ranker_score is not None
                else "dup" if c.status == DUPLICATE
                else "bad" if c.status != OK
                else ""
            )  # fmt: skip
            t = tid.get(c.file) if c.status != UNREADABLE else None
            yield c, css, os.path.basename(c.image.split("?", 1)[0]) or c.image, t

    text = render("selection.html.j2", shown, page_size, thumbs, title=title, summary=summary or {}, figures=figures)
    return text, _info(text, len(thumbs), len(files) - len(thumbs))
