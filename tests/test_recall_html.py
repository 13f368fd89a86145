"""The recall HTML report: self-contained, failures first, paginated, and every
thumbnail really decodes in a real browser (headless Chromium; skipped when absent)."""

from __future__ import annotations

import csv
import re

import pytest
from browser import CHROMIUM, SKIP_REASON, run_chromium, thumb_check
from fixtures import COLORS, solid_image, write_image

import recall_eval

K = 5
N_POIS = 120
PAGE = 50


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    img = d / "images"
    colors = list(COLORS.values())
    pois = [str(1000 + i) for i in range(N_POIS)]
    for i, p in enumerate(pois):
        for r in (1, 2):
            ext = ".png" if (i + r) % 3 == 0 else ".jpg"
            write_image(
                solid_image(
                    colors[(i + r) % len(colors)], size=(300 + i, 200), seed=i * 3 + r, shape="圆" if r == 1 else "方"
                ),
                img / f"{p}_{r}{ext}",
            )
    (img / "1000_1.jpg").write_bytes(b"corrupt")  # listed but has no thumbnail
    gallery = sorted(x.name for x in img.iterdir())
    # top-K results: POI i's own image at rank (i % 7) + 1 (a miss when > K)
    rows = []
    for i, p in enumerate(pois):
        own = next(g for g in gallery if g.startswith(p + "_"))
        others = [g for g in gallery if not g.startswith(p + "_")][i % 50 : i % 50 + K]
        ranked = others[:]
        pos = i % 7
        if pos < K:
            ranked.insert(pos, own)
        for r, g in enumerate(ranked[:K], 1):
            rows.append([p, f"名字<{i}>&", r, g, f"{1 - r / 100:.4f}"])
    res = d / "top.csv"
    with open(res, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["poi_id", "poi_name", "rank", "image", "score"])
        w.writerows(rows)
    html = d / "report.html"
    assert (
        recall_eval.main(
            [
                "--results",
                str(res),
                "--k",
                "1",
                str(K),
                "--html",
                str(html),
                "--image-dir",
                str(img),
                "--page-size",
                str(PAGE),
                "--no-progress",
            ]
        )
        == 0
    )
    misses = sum(1 for i in range(N_POIS) if i % 7 >= K)
    distinct = {r[3] for r in rows}
    return {"dir": d, "html": html, "rows": rows, "misses": misses, "distinct": distinct, "images": img}


def test_report_structure_without_browser(report):
    text = report["html"].read_text(encoding="utf-8")
    # self-contained: no external or file references, thumbnails as embedded JPEGs
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert str(report["images"]) not in text and "file:" not in text
    n_thumbs = text.count('"data:image/jpeg;base64,')
    assert n_thumbs == len(report["distinct"]) - 1  # each distinct image once; the corrupt one has none
    assert text.count('<div class="none">') == sum(1 for r in report["rows"] if r[3] == "1000_1.jpg")
    # names are escaped
    assert "名字&lt;3&gt;&amp;" in text and "名字<3>" not in text
    # pages of 50 POIs, failures first
    assert text.count('<section class="page"') == -(-N_POIS // PAGE)
    classes = re.findall(r'<div class="poi( miss)?">', text)
    assert len(classes) == N_POIS
    assert classes == [" miss"] * report["misses"] + [""] * (N_POIS - report["misses"])
    assert len(text) < 2_000_000


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_report_in_headless_chromium(report, tmp_path):
    url = report["html"].resolve().as_uri()
    per_poi = [
        sum(1 for r in report["rows"] if r[0] == p and r[3] != "1000_1.jpg")
        for p in dict.fromkeys(r[0] for r in report["rows"])
    ]
    # every page at once: every thumbnail decodes (naturalWidth > 0)
    c, _ = thumb_check(url + "#all", tmp_path)
    assert c.get("total") == sum(per_poi), c
    assert c["loaded"] == c["total"] and c["failed"] == 0
    # default view: only the first page is shown and filled
    c, dom = thumb_check(url, tmp_path)
    assert 0 < c["total"] < sum(per_poi) and c["loaded"] == c["total"]
    assert len(re.findall(r'<img data-t="t\d+"[^>]* src="data:image/jpeg', dom)) == c["total"]
    # page 3 through the address
    c3, _ = thumb_check(url + "#page=3", tmp_path)
    assert c3["loaded"] == c3["total"] > 0
    # a screenshot for people to look at
    shot = tmp_path / "report.png"
    out = run_chromium(["--window-size=1200,1600", f"--screenshot={shot}", url], tmp_path)
    assert out.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
