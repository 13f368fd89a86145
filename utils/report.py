"""A self-contained HTML page for recall results: every POI's name and its top-K images
with their scores, hits marked, failures first.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from PIL import Image
from tqdm import tqdm

from .metrics import RecallResult

log = logging.getLogger(__name__)

THUMB_PX = 96

_CSS = """
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

_JS = """
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


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def write_recall_report(path: str | os.PathLike, result: RecallResult, k: int,
                        resolve: Callable[[str], str | None], title: str = "Recall report",
                        summary: dict | None = None, page_size: int = 50,
                        workers: int = 4, progress: bool = True) -> dict:
    """Write the page. ``resolve(image) -> file path or None`` locates each listed
    image for its thumbnail. Failures (no hit in the top ``k``) come first, then hits,
    each in input order. Returns ``{"thumbnails": n, "missing": m, "bytes": size}``."""
    pois = sorted(result.pois, key=lambda p: p.hit_at(k))  # stable: misses first
    images = list(dict.fromkeys(img for p in pois for img, _ in p.top[:k]))
    files = {img: resolve(img) for img in images}

    def thumb(img):
        f = files[img]
        return thumbnail_data_uri(f) if f else None

    with ThreadPoolExecutor(max(1, workers)) as ex:
        uris = list(tqdm(ex.map(thumb, images), total=len(images), desc="thumbnails", unit="img",
                         disable=not progress, leave=False))
    tid = {}
    thumbs = {}
    for img, uri in zip(images, uris):
        if uri is not None:
            tid[img] = f"t{len(thumbs)}"
            thumbs[tid[img]] = uri
    missing = len(images) - len(thumbs)

    out = ['<!doctype html>\n<html lang="zh"><head><meta charset="utf-8">',
           f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_esc(title)}</h1>", '<p class="summary">']
    for key, val in (summary or {}).items():
        out.append(f"<span><b>{_esc(key)}</b>: {_esc(val)}</span>")
    n_miss = sum(not p.hit_at(k) for p in pois)
    out.append(f"<span><b>misses at {k}</b>: {n_miss} of {len(pois)} (shown first)</span></p>")
    out.append('<div id="thumb-check" data-loaded="" data-total=""></div>')
    out.append('<nav id="pager"></nav>')
    for a in range(0, len(pois), page_size):
        chunk = pois[a:a + page_size]
        label = f"{a + 1}-{a + len(chunk)}"
        out.append(f'<section class="page" data-label="{label}">')
        for p in chunk:
            hit = p.hit_at(k)
            res = (f"first hit at rank {p.first_hit}" if p.first_hit else "no hit listed") + \
                  ("" if hit else f" &mdash; miss at {k}")
            out.append(f'<div class="poi{"" if hit else " miss"}"><div class="head">'
                       f'<span class="id">{_esc(p.poi_id)}</span><b>{_esc(p.poi_name)}</b>'
                       f'<span class="res">{res}</span></div><div class="row">')
            for r, (img, score) in enumerate(p.top[:k], 1):
                own = os.path.basename(img).split("_", 1)[0] == p.poi_id
                name = os.path.basename(img)
                pic = (f'<img data-t="{tid[img]}" alt="{_esc(name)}" width="96" height="96">'
                       if img in tid else '<div class="none">no image</div>')
                out.append(f'<figure class="{"hit" if own else ""}" title="{_esc(img)}">{pic}'
                           f"<figcaption>#{r} {score:.4f}<br>{_esc(name)}</figcaption></figure>")
            out.append("</div></div>")
        out.append("</section>")
    blob = json.dumps(thumbs, separators=(",", ":")).replace("</", "<\\/")
    out.append(f'<script id="thumbs" type="application/json">{blob}</script>')
    out.append(f"<noscript>Thumbnails need JavaScript.</noscript><script>{_JS}</script></body></html>\n")
    text = "\n".join(out)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    size = os.path.getsize(path)
    log.info("wrote %s: %d POIs, %d thumbnails (%d images without one), %.1f MB",
             path, len(pois), len(thumbs), missing, size / 1e6)
    return {"thumbnails": len(thumbs), "missing": missing, "bytes": size}
