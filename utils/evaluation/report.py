"""Self-contained HTML pages: the recall report (every POI's name and its top-K images
with their scores, hits marked, failures first) and, through the same skeleton, the
selection page of select_images.py (utils/select.py).

The skeleton (:func:`page`, :func:`embed_thumbnails`, :func:`thumb_img`, :func:`esc`)
is what both pages share: the head with the CSS, the summary line, the pager, pages of
``<section class="page">``, the thumbnails as one JSON block, and the script.

The page needs nothing else to open: thumbnails (~96 px JPEGs) are embedded once each
as base64 data URIs in a JSON block and put into the visible page's ``<img>`` elements
by a few lines of inline JavaScript, 50 POIs a page, so 500 POIs x 10 images stay
light. ``#all`` in the address shows every page at once, ``#page=N`` opens page N.

After the visible thumbnails are decoded, the script writes the counts into
``<div id="thumb-check" data-loaded=".." data-failed=".." data-total="..">`` (an image
counts as loaded when ``naturalWidth > 0``); tests read it with a headless browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tqdm import tqdm

from utils.io import atomic_write

from .metrics import RecallResult

log = logging.getLogger(__name__)

THUMB_PX = 96

CSS = """
body{font:14px/1.35 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 6px}
.summary{margin:0 0 10px}
.summary span{display:inline-block;margin-right:18px}
nav{margin:8px 0;position:sticky;top:0;background:#fafafa;padding:4px 0;z-index:2}
nav button{margin:1px;padding:2px 7px}
nav button.cur{font-weight:bold;background:#333;color:#fff}
.poi{background:#fff;border:1px solid #ddd;border-left:5px solid #2a2;margin:6px 0;padding:6px 8px}
.poi.miss{border-left-color:#d22}
.head{margin-bottom:4px}
.head .id{color:#666;margin-right:6px}
.head .res{margin-left:10px;color:#555}
.miss .head .res{color:#c00;font-weight:bold}
.row{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:100px;text-align:center;font-size:11px}
figure img,figure .none{width:96px;height:96px;object-fit:contain;background:#eee;
  border:2px solid transparent;display:block;margin:auto}
figure.hit img,figure.hit .none{border-color:#2a2}
figure .none{display:flex;align-items:center;justify-content:center;color:#999}
figcaption{word-break:break-all}
figure.hit figcaption{color:#070;font-weight:bold}
.page{display:none}
.page.on{display:block}
"""

JS = """
(function(){
  var T = JSON.parse(document.getElementById('thumbs').textContent);
  var pages = document.querySelectorAll('.page');
  var nav = document.getElementById('pager');
  function fill(p){
    p.querySelectorAll('img[data-t]').forEach(function(i){
      if(!i.getAttribute('src')) i.src = T[i.getAttribute('data-t')];
    });
  }
  function check(){
    var imgs = Array.prototype.slice.call(document.querySelectorAll('.page.on img[data-t]'));
    Promise.all(imgs.map(function(i){
      return i.decode().then(function(){return i.naturalWidth > 0;}, function(){return false;});
    })).then(function(res){
      var ok = res.filter(function(x){return x;}).length;
      var d = document.getElementById('thumb-check');
      d.setAttribute('data-total', imgs.length);
      d.setAttribute('data-loaded', ok);
      d.setAttribute('data-failed', imgs.length - ok);
      d.textContent = 'thumbnails loaded: ' + ok + ' / ' + imgs.length;
    });
  }
  function show(n){
    pages.forEach(function(p, j){
      var on = (n === 'all' || j === n);
      p.classList.toggle('on', on);
      if(on) fill(p);
    });
    nav.querySelectorAll('button').forEach(function(b){
      b.classList.toggle('cur', b.getAttribute('data-p') === String(n));
    });
    check();
  }
  pages.forEach(function(p, j){
    var b = document.createElement('button');
    b.textContent = p.getAttribute('data-label'); b.setAttribute('data-p', j);
    b.onclick = function(){ location.hash = 'page=' + (j + 1); };
    nav.appendChild(b);
  });
  var all = document.createElement('button');
  all.textContent = 'all'; all.setAttribute('data-p', 'all');
  all.onclick = function(){ location.hash = 'all'; };
  nav.appendChild(all);
  function route(){
    var h = location.hash.replace('#', '');
    if(h === 'all'){ show('all'); return; }
    var m = /^page=(\\d+)$/.exec(h);
    var n = m ? Math.min(Math.max(parseInt(m[1], 10) - 1, 0), pages.length - 1) : 0;
    show(n);
  }
  window.addEventListener('hashchange', route);
  route();
})();
"""


def thumbnail_data_uri(path: str | os.PathLike, size: int = THUMB_PX, quality: int = 75) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail fitting ``size`` px, or None when
    the file cannot be read."""
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


def esc(x) -> str:
    """HTML-escape ``str(x)`` (quotes included: safe in attributes)."""
    return html.escape(str(x), quote=True)


# ---------------------------------------------------------------------------
# the page skeleton both reports use
# ---------------------------------------------------------------------------
def embed_thumbnails(
    keys: Iterable, file_of: Callable[[object], str | None] = lambda k: k, workers: int = 4, progress: bool = True
) -> tuple[dict, dict]:
    """Thumbnails of ``keys`` (each located by ``file_of(key)``, None = no file), made in
    ``workers`` threads. Returns ``(tid, thumbs)``: ``tid[key]`` = the id of its
    thumbnail (keys without a readable image are left out), ``thumbs[id]`` = data URI."""
    keys = list(keys)

    def thumb(k):
        f = file_of(k)
        return thumbnail_data_uri(f) if f else None

    with ThreadPoolExecutor(max(1, workers)) as ex:
        uris = list(
            tqdm(ex.map(thumb, keys), total=len(keys), desc="thumbnails", unit="img", disable=not progress, leave=False)
        )
    tid, thumbs = {}, {}
    for k, uri in zip(keys, uris):
        if uri is not None:
            tid[k] = f"t{len(thumbs)}"
            thumbs[tid[k]] = uri
    return tid, thumbs


def thumb_img(thumb_id: str | None, name: str) -> str:
    """The ``<img>`` the script fills with thumbnail ``thumb_id``, or the grey "no image"
    box when there is none."""
    if thumb_id is None:
        return '<div class="none">no image</div>'
    return f'<img data-t="{thumb_id}" alt="{esc(name)}" width="96" height="96">'


def summary_spans(summary: dict | None) -> list[str]:
    return [f"<span><b>{esc(k)}</b>: {esc(v)}</span>" for k, v in (summary or {}).items()]


def page(
    title: str,
    summary: list[str],
    pages: list[tuple[str, list[str]]],
    thumbs: dict,
    css: str = "",
    after_summary: list[str] = (),
) -> str:
    """The whole HTML document: ``summary`` (spans, see :func:`summary_spans`) in the
    summary line, ``after_summary`` blocks below it, then ``pages`` as
    ``(label, html parts)`` sections behind the pager, the thumbnails and the script."""
    summary = list(summary) or [""]
    summary[-1] += "</p>"
    out = [
        '<!doctype html>\n<html lang="zh"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{CSS}{css}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<p class="summary">',
        *summary,
        *after_summary,
        '<div id="thumb-check" data-loaded="" data-total=""></div>',
        '<nav id="pager"></nav>',
    ]
    for label, parts in pages:
        out.append(f'<section class="page" data-label="{label}">')
        out.extend(parts)
        out.append("</section>")
    blob = json.dumps(thumbs, separators=(",", ":")).replace("</", "<\\/")
    out.append(f'<script id="thumbs" type="application/json">{blob}</script>')
    out.append(f"<noscript>Thumbnails need JavaScript.</noscript><script>{JS}</script></body></html>\n")
    return "\n".join(out)


def write_page(path: str | os.PathLike, text: str) -> int:
    """Write the page atomically; returns its size in bytes."""
    with atomic_write(path) as f:
        f.write(text)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------
# the recall report
# ---------------------------------------------------------------------------
def write_recall_report(
    path: str | os.PathLike,
    result: RecallResult,
    k: int,
    resolve: Callable[[str], str | None],
    title: str = "Recall report",
    summary: dict | None = None,
    page_size: int = 50,
    workers: int = 4,
    progress: bool = True,
) -> dict:
    """Write the page. ``resolve(image) -> file path or None`` locates each listed
    image for its thumbnail. Failures (no hit in the top ``k``) come first, then hits,
    each in input order. Returns ``{"thumbnails": n, "missing": m, "bytes": size}``."""
    pois = sorted(result.pois, key=lambda p: p.hit_at(k))  # stable: misses first
    images = list(dict.fromkeys(img for p in pois for img, _ in p.top[:k]))
    tid, thumbs = embed_thumbnails(images, resolve, workers, progress)
    missing = len(images) - len(thumbs)

    n_miss = sum(not p.hit_at(k) for p in pois)
    spans = summary_spans(summary) + [f"<span><b>misses at {k}</b>: {n_miss} of {len(pois)} (shown first)</span>"]
    pages = []
    for a in range(0, len(pois), page_size):
        chunk = pois[a : a + page_size]
        parts = []
        for p in chunk:
            hit = p.hit_at(k)
            res = (f"first hit at rank {p.first_hit}" if p.first_hit else "no hit listed") + (
                "" if hit else f" &mdash; miss at {k}"
            )
            parts.append(
                f'<div class="poi{"" if hit else " miss"}"><div class="head">'
                f'<span class="id">{esc(p.poi_id)}</span><b>{esc(p.poi_name)}</b>'
                f'<span class="res">{res}</span></div><div class="row">'
            )
            for r, (img, score) in enumerate(p.top[:k], 1):
                own = os.path.basename(img).split("_", 1)[0] == p.poi_id
                name = os.path.basename(img)
                parts.append(
                    f'<figure class="{"hit" if own else ""}" title="{esc(img)}">'
                    f"{thumb_img(tid.get(img), name)}"
                    f"<figcaption>#{r} {score:.4f}<br>{esc(name)}</figcaption></figure>"
                )
            parts.append("</div></div>")
        pages.append((f"{a + 1}-{a + len(chunk)}", parts))
    text = page(title, spans, pages, thumbs)
    size = write_page(path, text)
    log.info(
        "wrote %s: %d POIs, %d thumbnails (%d images without one), %.1f MB",
        path,
        len(pois),
        len(thumbs),
        missing,
        size / 1e6,
    )
    return {"thumbnails": len(thumbs), "missing": missing, "bytes": size}
