"""select_images.py on a generated catalogue with tiny models: every candidate in the
output, one selection per item with a readable image, orderings that follow the scores,
scores equal to a direct computation with the models, the single/two encode paths, a
mixed local/URL catalogue through a local server, duplicates, unreadable and missing
images, unknown POIs, bad rows and the HTML report."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import CHROMIUM, SKIP_REASON, thumb_check
from fixtures import COLORS, png_bytes, solid_image, tiny_align, tiny_ranker, write_image
from local_server import LocalServer

import select_images
from models.align import load_tokenizer
from models.checkpoint import load_align_model, load_ranker, save_align_checkpoint, save_ranker_checkpoint
from models.engine.encode import tokenize
from utils.formats.images import load_image
from utils.formats.poi import PoiTables, save_tables

DIM = 32
K = 3
COLOR_LIST = list(COLORS.items())
SHAPES = ["圆", "方", None]


@pytest.fixture(scope="module")
def env(tmp_path_factory, bert_dir):
    d = tmp_path_factory.mktemp("select")
    ranker = tiny_ranker(bert_dir, seed=3)
    save_ranker_checkpoint(ranker, d / "ranker.ckpt")
    save_align_checkpoint(ranker.align_model, d / "same_align.pth")  # the ranker's own copy
    save_align_checkpoint(tiny_align(bert_dir, seed=11), d / "other_align.pth")

    # POI tables: 西湖 and 古镇 known, 北京 only in pic-num (unknown vectors), 山海 nowhere
    rng = np.random.default_rng(0)
    known = ["西湖", "古镇", "红塔"]
    pic = {"西湖": [3, 1, 0], "古镇": [9, 2, 1], "红塔": [1, 0, 0], "北京": [50, 5, 5]}
    save_tables({d / "pic.npz": pic}, kind="pic_num")
    save_tables({d / "img.npz": {n: rng.normal(size=DIM).astype(np.float32) for n in known}})
    save_tables({d / "name.npz": {n: rng.normal(size=DIM).astype(np.float32) for n in known}})

    srv = LocalServer().start()
    cat = d / "cat"
    rows = [["item_id", "title", "poi_names", "image", "extra"]]
    files = {}
    pois_of = ["西湖,古镇", "", "北京,西湖,山海", "红塔", "古镇", " "]
    for i in range(6):
        title = f"{COLOR_LIST[i][0]}色{'圆' if i % 2 else '方'}形"
        for j in range(5):
            color = COLOR_LIST[(i + j) % len(COLOR_LIST)][1]
            img = solid_image(color, size=(80 + 7 * j, 60 + 5 * i), shape=SHAPES[j % 3], seed=10 * i + j)
            if j == 4 and i % 2 == 0:  # URL candidate
                route = f"/i{i}/c{j}"  # no extension, as real catalogue URLs often are
                srv.add(route, png_bytes(img), content_type="image/png")
                ref = srv.url(route)
            elif j == 3 and i == 1:  # absolute path
                ref = str(write_image(img, d / "abs" / f"{i}_{j}.jpg"))
            else:
                rel = f"imgs/{i}_{j}.{'png' if j % 2 else 'jpg'}"
                write_image(img, cat / rel)
                ref = rel
            files[(i, j)] = ref
            rows.append([f"item{i}", title, pois_of[i], ref, "x"])
    # extras: a duplicate (same relative path twice in item0), an undecodable file in item1,
    # a missing file and a 404 URL in item2; an item with nothing readable; bad rows
    rows.append(["item0", "ignored title", "", files[(0, 1)], ""])
    (cat / "imgs" / "corrupt.jpg").write_bytes(b"not an image at all")
    rows.append(["item1", "x", "", "imgs/corrupt.jpg", ""])
    rows.append(["item2", "x", "", "imgs/nowhere.jpg", ""])
    srv.add("/gone.jpg", b"", status=404)
    rows.append(["item2", "x", "", srv.url("/gone.jpg"), ""])
    rows.append(["dead", "黑色", "西湖", "imgs/corrupt.jpg", ""])
    rows.append(["dead", "黑色", "西湖", "imgs/missing.png", ""])
    rows.append(["dead", "黑色", "西湖", srv.url("/gone.jpg"), ""])
    bad = [["", "no id", "", "imgs/0_0.jpg", ""], ["item3", "t", "", "  ", ""], ["item4", "short"]]
    rows[5:5] = bad  # bad rows in the middle: lines 6, 7, 8
    cat.mkdir(exist_ok=True)
    with open(cat / "items.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    yield {"dir": d, "csv": cat / "items.csv", "rows": rows, "srv": srv, "bert": bert_dir, "ranker": ranker}
    srv.stop()


def _run(env, name, *extra, tables=True, recall="same_align.pth", html=False):
    d = env["dir"]
    out = d / f"{name}.csv"
    argv = [
        "--items",
        str(env["csv"]),
        "--out",
        str(out),
        "--ranker-checkpoint",
        str(d / "ranker.ckpt"),
        "--bert-dir",
        str(env["bert"]),
        "--recall-k",
        str(K),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--backend",
        "torch",
        "--image-cache",
        str(d / "url_cache"),
        "--no-progress",
        "--skip-bad-rows",
        *extra,
    ]
    if recall:
        argv += ["--recall-checkpoint", str(d / recall)]
    if tables:
        argv += [
            "--poi-pic-num",
            str(d / "pic.npz"),
            "--poi-image-vectors",
            str(d / "img.npz"),
            "--poi-name-vectors",
            str(d / "name.npz"),
        ]
    if html:
        argv += ["--html", str(d / f"{name}.html")]
    assert select_images.main(argv) == 0
    with open(out, encoding="utf-8", newline="") as f:
        got = list(csv.DictReader(f))
    summary = json.loads(Path(f"{out}.summary.json").read_text(encoding="utf-8"))
    return got, summary


def _f(x):
    return float(x) if x != "" else None


@pytest.fixture(scope="module")
def single(env):
    return _run(env, "single", html=True)


@pytest.fixture(scope="module")
def two(env):
    return _run(env, "two", tables=False, recall="other_align.pth")


def _by_item(rows):
    out = {}
    for r in rows:
        out.setdefault(r["item_id"], []).append(r)
    return out


def _check_orderings(rows, k):
    for item, rs in _by_item(rows).items():
        ok = [r for r in rs if r["status"] == "ok"]
        sel = [r for r in rs if r["selected"] == "1"]
        assert len(sel) == (1 if ok else 0), item
        for r in rs:
            if r["status"] != "ok":
                assert r["recall_score"] == r["recall_rank"] == r["ranker_score"] == r["final_rank"] == ""
                assert r["selected"] == "0"
        # recall rank: by recall score descending, 1..n
        by_rank = sorted(ok, key=lambda r: int(r["recall_rank"]))
        assert [int(r["recall_rank"]) for r in by_rank] == list(range(1, len(ok) + 1))
        scores = [float(r["recall_score"]) for r in by_rank]
        assert scores == sorted(scores, reverse=True)
        # stage 2: exactly the top-k of recall
        staged = [r for r in ok if r["ranker_score"] != ""]
        assert {r["line"] for r in staged} == {r["line"] for r in by_rank[:k]}
        # final: stage-2 by ranker score, then the rest by recall score
        final = sorted(ok, key=lambda r: int(r["final_rank"]))
        assert [int(r["final_rank"]) for r in final] == list(range(1, len(ok) + 1))
        head, tail = final[: len(staged)], final[len(staged) :]
        assert all(r["ranker_score"] != "" for r in head)
        rs_ = [float(r["ranker_score"]) for r in head]
        assert rs_ == sorted(rs_, reverse=True)
        assert [r["line"] for r in tail] == [r["line"] for r in by_rank[len(staged) :]]
        if ok:
            assert sel[0]["final_rank"] == "1"


def _direct(env, rows, recall_ckpt, tables, lines):
    """Recall and ranker scores of the candidates on ``lines``, computed directly with
    the models (full forward pass of the ranker), independent of select_images."""
    d, bert = env["dir"], env["bert"]
    recall = load_align_model(d / recall_ckpt, bert)
    ranker = load_ranker(d / "ranker.ckpt", bert)
    tok = load_tokenizer(bert)
    items = {}
    for r in env["rows"][1:]:
        if len(r) >= 4 and r[0] and r[3].strip():
            items.setdefault(r[0], r)  # an item's title and POIs come from its first row
    out = {}
    with torch.no_grad():
        for r in rows:
            if r["line"] not in lines:
                continue
            _, title, pois, _ = items[r["item_id"]][:4]
            x, good = load_image(r["file"])
            assert good
            enc = tokenize(tok, [title])
            rec = float(recall.encode_image(x[None]) @ recall.encode_text(**enc)[0])
            inp = PoiTables(*tables, DIM).inputs(title, pois) if tables else None
            text = inp.pois_text if inp else (pois if pois.strip() else title)
            feat = ranker.align_model.encode_text(**tokenize(tok, [text]))
            pimg = torch.from_numpy(inp.poi_img)[None] if inp else torch.zeros(1, 5, DIM)
            ptxt = torch.from_numpy(inp.poi_txt)[None] if inp else torch.zeros(1, 5, DIM)
            plen = torch.tensor([inp.poi_len if inp else 0])
            out[r["line"]] = (rec, float(ranker(x[None], feat, pimg, ptxt, plen)))
    return out


def _tables(env):
    from utils.formats.poi import load_poi_table

    d = env["dir"]
    return tuple(load_poi_table(d / n) for n in ("pic.npz", "img.npz", "name.npz"))


def test_single_path_output_and_orderings(env, single):
    rows, summary = single
    n_good_rows = len(env["rows"]) - 1 - 3
    assert len(rows) == n_good_rows == summary["candidates"]
    assert summary["encode_path"] == "single"
    assert summary["recall_weights_sha256"] == summary["ranker_recall_copy_sha256"]
    assert summary["images_encoded"]["stage2"] == 0
    _check_orderings(rows, K)
    by = _by_item(rows)
    assert set(by) == {f"item{i}" for i in range(6)} | {"dead"}
    assert summary["items_selected"] == 6
    assert summary["items_without_readable_candidate"] == ["dead"]
    # statuses
    st = {(r["item_id"], r["image"]): r["status"] for r in rows}
    assert st[("item1", "imgs/corrupt.jpg")] == "unreadable"
    assert st[("item2", "imgs/nowhere.jpg")] == "missing"
    assert st[("item2", env["srv"].url("/gone.jpg"))] == "download_failed"
    assert {r["status"] for r in by["dead"]} == {"unreadable", "missing", "download_failed"}
    dups = [r for r in rows if r["status"] == "duplicate"]
    assert len(dups) == 1 and dups[0]["item_id"] == "item0" and dups[0]["selected"] == "0"
    orig = next(r for r in by["item0"] if r["image"] == dups[0]["image"] and r["status"] == "ok")
    assert f"line {orig['line']}" in dups[0]["detail"]
    # every distinct readable file encoded once (the corrupt file is shared by two items)
    ok_files = {r["file"] for r in rows if r["status"] == "ok"}
    assert summary["distinct_images"] == len(ok_files) + 1
    assert summary["images_encoded"]["stage1"] == len(ok_files) + 1
    # every distinct text once: titles and pois_feature texts (poi_names if not blank, else title)
    first = {}
    for r in env["rows"][1:]:
        if len(r) >= 4 and r[0] and r[3].strip():
            first.setdefault(r[0], r)
    texts = {r[1] for r in first.values()} | {r[2] if r[2].strip() else r[1] for r in first.values()}
    assert summary["texts_encoded"] == len(texts)
    # bad rows reported with their line numbers
    assert summary["bad_rows"] == 3
    assert [int(re.search(r":(\d+):", e).group(1)) for e in summary["bad_row_list"]] == [6, 7, 8]
    assert "item_id" in summary["bad_row_list"][0] and "image" in summary["bad_row_list"][1]
    # unknown POIs: 北京 (no vectors) and 山海 (nowhere) in item2's sequence
    assert summary["unknown_pois"] == sorted(["北京", "山海"])
    assert summary["items_with_unknown_poi"] == 1
    # URLs were downloaded into the cache, named by a hash of the URL
    url_rows = [r for r in rows if r["image"].startswith("http") and r["status"] == "ok"]
    assert len(url_rows) == 3
    assert all(Path(r["file"]).parent == env["dir"] / "url_cache" for r in url_rows)


def test_single_path_scores_match_direct_computation(env, single):
    rows, _ = single
    staged = [r for r in rows if r["ranker_score"] != ""]
    # items with POIs, with unknown POIs, without POIs; local files and URL downloads
    pick = {next(r["line"] for r in staged if r["item_id"] == i) for i in ("item0", "item1", "item2")}
    pick |= {r["line"] for r in staged if r["image"].startswith("http")}
    direct = _direct(env, rows, "same_align.pth", _tables(env), pick)
    for r in rows:
        if r["line"] in direct:
            rec, rank = direct[r["line"]]
            assert float(r["recall_score"]) == pytest.approx(rec, abs=1e-4)
            assert float(r["ranker_score"]) == pytest.approx(rank, abs=1e-4)


def test_two_path_when_recall_model_differs(env, single, two):
    rows, summary = two
    assert summary["encode_path"] == "two"
    assert summary["recall_weights_sha256"] != summary["ranker_recall_copy_sha256"]
    staged = [r for r in rows if r["ranker_score"] != ""]
    assert summary["stage2_candidates"] == len(staged) == 6 * K
    assert summary["images_encoded"]["stage2"] == len({r["file"] for r in staged})
    assert summary["poi_tables"] is False and summary["unknown_pois"] == []
    _check_orderings(rows, K)
    # different recall model: different stage-1 scores
    s1 = {r["line"]: r["recall_score"] for r in single[0] if r["status"] == "ok"}
    assert any(s1[r["line"]] != r["recall_score"] for r in rows if r["status"] == "ok")
    # stage 2 uses the ranker's copy for the images; no tables: empty POI sequence
    pick = {staged[0]["line"], next(r["line"] for r in staged if r["item_id"] == "item3")}
    direct = _direct(env, rows, "other_align.pth", None, pick)
    for r in rows:
        if r["line"] in direct:
            rec, rank = direct[r["line"]]
            assert float(r["recall_score"]) == pytest.approx(rec, abs=1e-4)
            assert float(r["ranker_score"]) == pytest.approx(rank, abs=1e-4)


def test_no_recall_checkpoint_uses_ranker_copy_and_reuses_downloads(env, single):
    srv = env["srv"]
    before = srv.total_requests
    rows, summary = _run(env, "nocp", recall=None)
    assert summary["encode_path"] == "single"
    assert summary["images_encoded"]["stage2"] == 0
    # the same weights as the saved copy: identical results
    key = lambda rs: [
        (r["line"], r["status"], r["recall_score"], r["ranker_score"], r["final_rank"], r["selected"]) for r in rs
    ]
    assert key(rows) == key(single[0])
    # the 3 good URLs come from the image cache; only the failed URL is asked again
    assert summary["downloads"]["reused"] == 3 and summary["downloads"]["downloaded"] == 0
    assert all(p == "/gone.jpg" for _, p, _ in srv.log[-(srv.total_requests - before) :])


def test_recall_only(env, single):
    rows, summary = _run(env, "ronly", "--recall-only", tables=False)
    assert summary["encode_path"] == "recall-only"
    assert all(r["ranker_score"] == "" for r in rows)
    _check_orderings(rows, 0)
    # stage 1 is the same model as the single run: same recall ranks
    s = {r["line"]: r["recall_rank"] for r in single[0]}
    assert all(s[r["line"]] == r["recall_rank"] == r["final_rank"] for r in rows if r["status"] == "ok")


def test_html_report(env, single):
    html = (env["dir"] / "single.html").read_text(encoding="utf-8")
    _, summary = single
    for i in range(6):
        assert f">item{i}<" in html
    # the item without a selection is listed first
    assert html.index(">dead<") < html.index(">item0<")
    assert html.count('class="sel"') == 6
    n_thumbs = len(re.findall(r'"t\d+":"data:image/jpeg;base64,', html))
    assert n_thumbs == summary["html"]["thumbnails"] >= summary["distinct_images"] - 1
    assert "no readable candidate" in html


def test_bad_inputs(env, tmp_path, capsys):
    d = env["dir"]
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,title,image\n1,t,a.jpg\n", encoding="utf-8")
    base = [
        "--out",
        str(tmp_path / "o.csv"),
        "--ranker-checkpoint",
        str(d / "ranker.ckpt"),
        "--bert-dir",
        str(env["bert"]),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert select_images.main(["--items", str(bad), *base]) == 2
    assert "poi_names" in capsys.readouterr().err
    good = env["csv"]
    assert select_images.main(["--items", str(good), *base, "--poi-pic-num", str(d / "pic.npz")]) == 2
    assert "all three" in capsys.readouterr().err
    assert select_images.main(["--items", str(good), *base[:2], "--bert-dir", str(env["bert"])]) == 2
    assert "--ranker-checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_html_thumbnails_decode_in_headless_chromium(env, single, tmp_path):
    html = env["dir"] / "single.html"
    counts, _ = thumb_check(html.as_uri() + "#all", tmp_path)
    # every shown image of a readable or duplicate candidate has a thumbnail that decodes
    shown = sum(1 for r in single[0] if r["status"] in ("ok", "duplicate"))
    assert counts["total"] == shown and counts["loaded"] == shown and counts["failed"] == 0


def test_local_path_never_imports_ray(env, tmp_path):
    """Ray is optional: a local run (and importing the script) loads no part of it."""
    import subprocess
    import sys

    d = env["dir"]
    argv = [
        "--items",
        str(env["csv"]),
        "--out",
        str(tmp_path / "o.csv"),
        "--recall-only",
        "--ranker-checkpoint",
        str(d / "ranker.ckpt"),
        "--bert-dir",
        str(env["bert"]),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--backend",
        "torch",
        "--no-progress",
        "--skip-bad-rows",
        "--image-cache",
        str(d / "url_cache"),
    ]
    code = (
        "import sys, select_images; rc = select_images.main(sys.argv[1:]); "
        "print(rc, sorted(m for m in sys.modules if m == 'ray' or "
        "m.startswith(('ray.', 'select_ray', 'utils.selection.ray_runner'))))"
    )
    root = Path(select_images.__file__).resolve().parent
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600, cwd=root)
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stderr[-2000:]
