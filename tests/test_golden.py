"""Golden outputs of every script, kept identical through the package refactor.

The files under tests/golden/ were recorded on commit 7d801f3, before the refactor that
moves the code into subpackages. Re-record them (``AVAS_GOLDEN_RECORD=1 pytest
tests/test_golden.py``) only on purpose, when an output format changes by design, and
say so in the commit; a difference is otherwise a regression.

Each case runs scripts the way a user does, through ``main(argv)`` (script names and
flags survive the refactor), in a temporary folder with relative paths, on inputs made
here with tests/fixtures.py, and compares the outputs with the recorded ones
(tests/golden_files.py: what is normalised, and the tolerant mode on another machine).

Models: fixtures.tiny_align / tiny_ranker, saved with the package's savers. The
BatchNorm statistics of their image towers come from forward passes
(fixtures.calibrate_image_tower) whose last bits depend on the CPU kind (AVX2 or
AVX-512); every other weight comes from torch's seeded generator, the same on both.
The statistics recorded in tests/golden/inputs/image_bn.pt replace them, so weights and
weight hashes are the same on any such CPU.

After the refactor, update the import marked MOVES (the checkpoint savers).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import COLORS, make_bert_dir, png_bytes, solid_image, tiny_align, tiny_ranker, write_image
from golden_files import GOLDEN, RECORD, Golden
from local_server import Fault

import build_poi_tables
import download_images
import poi_tables
import rank_eval
import recall_eval
import recall_infer
import select_images
from models.checkpoint import save_align_checkpoint, save_ranker_checkpoint  # MOVES

SEP = "$record$"
PALETTE = list(COLORS.values())
SHAPES = ("圆", "方", None)
NAMES = {
    "101": "红色圆",
    "102": "蓝色方",
    "103": "绿色山",
    "104": "红色圆",
    "105": "黄色海",
    "106": "紫色塔",
    "107": "白色桥",
}  # 104 shares 101's name
RANK_ROWS = [  # item_id, ctr_a, ctr_b, title, poi_names, image a, image b (a shape, "missing", "broken")
    ("201", 2, 1, "红色圆形", "红色圆,蓝色方,绿色山", "圆", "方"),
    ("202", 1, 2, "北京长城", "", None, "圆"),  # no POIs
    ("203", 2, 1, "上海乐园", "紫色塔,白色桥,黄色海,绿色山,蓝色方,红色圆", "方", None),  # > 5 POIs
    ("204", 1, 2, "大小岛", "未知地,黄色海", "圆", "missing"),  # unknown POI
    ("205", 1, 2, "古城", "a", None, "broken"),  # one character
    ("206", 2, 1, "三角塔", "紫色塔 , 白色桥", "方", "圆"),  # spaces around commas
]
CATALOGUE = [  # item_id, title, poi_names, candidate images (N_M.* are generated)
    ("item0", "红色方形", "红色圆,蓝色方", ["0_0.jpg", "0_1.png", "0_2.jpg", "0_3.png", "0_1.png"]),
    ("item1", "蓝色圆形", "", ["1_0.jpg", "1_1.png", "corrupt.jpg", "1_3.png"]),
    ("item2", "绿色方形", "紫色塔,未知,白色桥", ["2_0.jpg", "nowhere.jpg", "2_2.jpg", "2_3.png", "2_4.jpg"]),
    ("item3", "黄色圆形", "黄色海", ["3_0.jpg", "3_1.png", "3_2.jpg"]),
    ("dead", "黑色", "红色圆", ["corrupt.jpg", "missing.png"]),
]
TABLES = ("--poi-pic-num", "pic.npy", "--poi-image-vectors", "tables/img.npz", "--poi-name-vectors", "tables/name.npy")
RECALL_FILES = ("top10.csv", "full.csv", "emb.npz", "top10.csv.missing.tsv")


def run(script, cwd: Path, *argv) -> None:
    with contextlib.chdir(cwd):
        assert script.main([str(a) for a in argv]) == 0


def with_recorded_bn(align, stats: dict):
    """``align`` with the recorded image-tower BatchNorm statistics (module docstring)."""
    assert not align.image_model.load_state_dict(stats, strict=False).unexpected_keys
    return align


def write_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_bn(tmp_path_factory) -> dict:
    """``{seed: BatchNorm running statistics of the calibrated image tower}`` as recorded."""
    path = GOLDEN / "inputs" / "image_bn.pt"
    if RECORD:
        bert = make_bert_dir(tmp_path_factory.mktemp("bert"))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                str(s): {k: v for k, v in tiny_align(bert, seed=s).image_model.state_dict().items() if "running_" in k}
                for s in (1, 3)
            },
            path,
        )
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def golden(work):
    return Golden(work)


@pytest.fixture(scope="module")
def work(tmp_path_factory, image_bn) -> Path:
    d = tmp_path_factory.mktemp("golden")
    bert = make_bert_dir(d / "bert")
    save_align_checkpoint(with_recorded_bn(tiny_align(bert, seed=1), image_bn["1"]), d / "align.pth")
    ranker = tiny_ranker(bert, seed=3)
    with_recorded_bn(ranker.align_model, image_bn["3"])
    save_ranker_checkpoint(ranker, d / "ranker.ckpt")

    # recall gallery: 7 POIs x 4 images, one missing on disk, one unreadable, a repeated row
    rows = []
    for pid, name in NAMES.items():
        for r in range(1, 5):
            rows.append([pid, name, f"https://example.invalid/{pid}_{r}", r, 96, 64, 1])
            if (pid, r) != ("105", 4):
                img = solid_image(
                    PALETTE[int(pid) % 8], size=(80 + 8 * r, 64), shape=SHAPES[r % 3], seed=int(pid) * 10 + r
                )
                write_image(img, d / "images" / f"{pid}_{r}.{'png' if r == 2 else 'jpg'}")
    (d / "images" / "103_3.jpg").write_bytes(b"not an image")
    write_csv(d / "recall.csv", rows + rows[:1])

    # ranking pairs: a missing and an unreadable image, a repeated item, a bad line
    (d / "rank_images").mkdir()
    lines = []
    for k, (item, ca, cb, title, pois, a, b) in enumerate(RANK_ROWS):
        for side, shape in (("a", a), ("b", b)):
            path = d / "rank_images" / f"{item}_{side}.{'jpg' if side == 'a' else 'png'}"
            if shape == "broken":
                path.write_bytes(b"\xff\xd8 not a jpeg")
            elif shape != "missing":
                write_image(
                    solid_image(PALETTE[(k + (side == "b")) % 8], size=(80 + 9 * k, 60), shape=shape, seed=k), path
                )
        lines.append(
            SEP.join(
                [
                    item,
                    f"http://x/{item}a",
                    f"http://x/{item}b",
                    str(ca),
                    str(cb),
                    title,
                    "cate",
                    f"http://o/{item}a",
                    f"http://o/{item}b",
                    pois,
                ]
            )
        )
    (d / "rank.csv").write_text("\n".join(lines + lines[:1] + ["oops"]) + "\n", encoding="utf-8")
    # the published pic-num format: a pickled dict of [n0, n1, n2]
    np.save(
        d / "pic.npy",
        {n: [i, i % 3, 2 * i % 5] for i, n in enumerate(dict.fromkeys(NAMES.values()))},
        allow_pickle=True,
    )

    # catalogue: a repeated image, an undecodable and a missing file, an item with nothing readable
    rows = [["item_id", "title", "poi_names", "image"]]
    for i, (item, title, pois, images) in enumerate(CATALOGUE):
        for j, name in enumerate(images):
            rows.append([item, title, pois, f"imgs/{name}"])
            path = d / "catalogue" / "imgs" / name
            if name[0].isdigit() and not path.exists():
                write_image(
                    solid_image(
                        PALETTE[(i + j) % 8], size=(70 + 7 * j, 60 + 5 * i), shape=SHAPES[j % 3], seed=10 * i + j
                    ),
                    path,
                )
    rows[4:4] = [["", "no id", "", "imgs/0_0.jpg"], ["item3", "t", "", "  "], ["item4", "short"]]
    write_csv(d / "catalogue" / "items.csv", rows)
    (d / "catalogue" / "imgs" / "corrupt.jpg").write_bytes(b"not an image at all")
    return d


def infer(cwd: Path, out: str, *extra, checkpoint="align.pth") -> Path:
    run(
        recall_infer,
        cwd,
        "--model",
        "align",
        "--csv",
        "recall.csv",
        "--image-dir",
        "images",
        "--checkpoint",
        checkpoint,
        "--bert-dir",
        "bert",
        "--output",
        f"{out}/top10.csv",
        "--full-output",
        f"{out}/full.csv",
        "--save-embeddings",
        f"{out}/emb.npz",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    )
    return cwd / out


@pytest.fixture(scope="module")
def recall_torch(work) -> Path:
    return infer(work, "recall/torch/plain", "--backend", "torch")


@pytest.fixture(scope="module")
def tables(work) -> Path:
    """build_poi_tables.py on the recall gallery: the vector tables of the ranking cases."""
    run(
        build_poi_tables,
        work,
        "--csv",
        "recall.csv",
        "--image-dir",
        "images",
        "--checkpoint",
        "align.pth",
        "--bert-dir",
        "bert",
        "--out-image-vectors",
        "tables/img.npz",
        "--out-name-vectors",
        "tables/name.npz",
        "--also-npy",
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--no-progress",
    )
    return work / "tables"


# ---------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_recall_infer(work, golden, recall_torch, backend):
    """Plain, then twice with the embedding cache (the second run serves every image
    from it): the same files; the run records differ in their counts."""
    for name, extra in (
        ("plain", ()),
        ("cache-cold", ("--cache-dir", f"cache/{backend}")),
        ("cache-warm", ("--cache-dir", f"cache/{backend}")),
    ):
        out = (
            recall_torch
            if (backend, name) == ("torch", "plain")
            else infer(work, f"recall/{backend}/{name}", "--backend", backend, *extra)
        )
        for f in RECALL_FILES:
            golden.check(f"recall_infer/{backend}/{f}", out / f)
        golden.check(f"recall_infer/{backend}/{name}.meta.json", out / "top10.csv.meta.json")


def test_recall_eval(work, golden, recall_torch):
    rel = recall_torch.relative_to(work)
    for flag, src in (("--results", "top10.csv"), ("--results", "full.csv"), ("--embeddings", "emb.npz")):
        run(recall_eval, work, flag, rel / src, "--json", rel / f"{src}.eval.json", "--no-progress")
        golden.check(f"recall_eval/{src}.eval.json", recall_torch / f"{src}.eval.json")
    # a second model (the ranker's copy of the recall model, read from the ranker checkpoint)
    other = infer(work, "recall/ranker-copy", "--backend", "torch", checkpoint="ranker.ckpt")
    golden.check("recall_infer/ranker-copy/top10.csv", other / "top10.csv")
    run(
        recall_eval,
        work,
        "--compare",
        rel / "top10.csv",
        other.relative_to(work) / "top10.csv",
        "--json",
        "compare.json",
        "--no-progress",
    )
    golden.check("recall_eval/compare.json", work / "compare.json")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_rank_eval(work, golden, tables, backend):
    """Plain and twice with the embedding cache: the same scores and metrics."""
    for name, extra in (
        ("plain", ()),
        ("cache-cold", ("--cache-dir", f"cache/rank-{backend}")),
        ("cache-warm", ("--cache-dir", f"cache/rank-{backend}")),
    ):
        out = f"rank/{backend}/{name}"
        run(
            rank_eval,
            work,
            "--csv",
            "rank.csv",
            "--image-dir",
            "rank_images",
            "--checkpoint",
            "ranker.ckpt",
            "--bert-dir",
            "bert",
            *TABLES,
            "--output",
            f"{out}/scores.csv",
            "--metrics",
            f"{out}/metrics.json",
            "--backend",
            backend,
            "--device",
            "cpu",
            "--no-progress",
            "--skip-bad-rows",  # rank.csv holds a bad line on purpose: refused by default
            *extra,
        )
        for f in ("scores.csv", "metrics.json"):
            golden.check(f"rank_eval/{backend}/{f}", work / out / f)


def select(cwd: Path, golden, name: str, *extra) -> None:
    run(
        select_images,
        cwd,
        "--items",
        "catalogue/items.csv",
        "--out",
        f"select/{name}.csv",
        "--ranker-checkpoint",
        "ranker.ckpt",
        "--bert-dir",
        "bert",
        "--recall-k",
        "3",
        "--device",
        "cpu",
        "--no-progress",
        "--skip-bad-rows",  # the catalogue holds bad rows on purpose: refused by default
        *extra,
    )
    for f in (f"{name}.csv", f"{name}.csv.summary.json"):
        golden.check(f"select_images/{f}", cwd / "select" / f)


@pytest.mark.parametrize("with_tables", [True, False], ids=["tables", "no-tables"])
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_select_images(work, golden, tables, backend, with_tables):
    """Stage 1 on another recall model than the ranker's copy (the "two" encode path)."""
    select(
        work,
        golden,
        f"{backend}-{'tables' if with_tables else 'no-tables'}",
        "--backend",
        backend,
        "--recall-checkpoint",
        "align.pth",
        *(TABLES if with_tables else ()),
    )


def test_select_images_single_path_and_recall_only(work, golden, tables):
    select(work, golden, "single", "--backend", "torch", *TABLES)
    select(work, golden, "recall-only", "--backend", "torch", "--recall-only", "--recall-checkpoint", "align.pth")


def test_poi_tables(work, golden, tables, capsys):
    """build_poi_tables.py's tables (both formats), and poi_tables.py convert (.npy ->
    .npz and back) and info."""
    for f in ("img.npz", "name.npz", "img.npy", "name.npy"):
        golden.check(f"build_poi_tables/{f}", tables / f)
    for src, dst in (
        ("pic.npy", "conv/pic.npz"),
        ("tables/name.npy", "conv/name.npz"),
        ("tables/img.npz", "conv/img.npy"),
    ):
        run(poi_tables, work, "convert", src, dst)
        golden.check(f"poi_tables/{Path(dst).name}", work / dst)
    capsys.readouterr()
    for f in ("conv/pic.npz", "tables/name.npy"):
        run(poi_tables, work, "info", f)
    (work / "conv" / "info.txt").write_text(capsys.readouterr().out, encoding="utf-8")
    golden.check("poi_tables/info.txt", work / "conv" / "info.txt")


def files_listing(folder: Path) -> Path:
    """``{file name: sha256}`` of the images a download left in ``folder``, as JSON."""
    skip = {"manifest.jsonl", "manifest.jsonl.prev", "download_images.log", ".lock"}
    listing = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name not in skip
    }
    out = folder.with_suffix(".files.json")
    out.write_text(json.dumps(listing, indent=1), encoding="utf-8")
    return out


def test_download_images(work, golden, server, no_proxy_env):
    """A recall CSV (ok, redirected, 404, not an image, a 503 then ok, a bad row), its
    resumed rerun, and a ranking CSV (durable copy first, then the original URL)."""
    jpg, png = (work / "images" / "101_1.jpg").read_bytes(), (work / "images" / "101_2.png").read_bytes()
    server.add("/p/301_1.png", png)
    server.add("/p/301_2", jpg, content_type="image/jpeg")
    server.add("/moved", redirect="/p/302_1.jpg")
    server.add("/p/302_1.jpg", jpg)
    server.add("/gone.jpg", status=404)
    server.add("/text.jpg", b"<html>not an image</html>", content_type="text/html")
    server.add("/flaky.jpg", png_bytes(solid_image(PALETTE[3], seed=7)), faults=[Fault(status=503)])
    urls = [
        ("301", 1, "/p/301_1.png"),
        ("301", 2, "/p/301_2"),
        ("302", 1, "/moved"),
        ("302", 2, "/gone.jpg"),
        ("303", 1, "/text.jpg"),
        ("303", 2, "/flaky.jpg"),
    ]
    dl = work / "dl"
    dl.mkdir()
    (dl / "recall.csv").write_text(
        "".join(f"{p},景点{p},{server.url(u)},{r},10,10,\n" for p, r, u in urls) + "bad,row\n", encoding="utf-8"
    )
    (dl / "rank.csv").write_text(
        "\n".join(
            [
                SEP.join(
                    [
                        "401",
                        server.url("/p/302_1.jpg"),
                        server.url("/p/301_1.png"),
                        "1",
                        "2",
                        "标题",
                        "类目",
                        server.url("/moved"),
                        server.url("/gone.jpg"),
                        "西湖",
                    ]
                ),
                SEP.join(
                    ["402", server.url("/gone.jpg"), server.url("/text.jpg"), "2", "1", "标题", "类目", "", "", ""]
                ),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    subs = {server.base_url: "http://<server>", server.base_url.split("//")[1]: "<server>"}
    for name, out in (("recall", "recall"), ("recall-rerun", "recall"), ("rank", "rank")):
        run(
            download_images,
            dl,
            "--csv",
            f"{out}.csv",
            "--out",
            out,
            "--backoff",
            "0.01",
            "--max-failures",
            "10",
            "--no-progress",
            "--skip-bad-rows",  # recall.csv holds a bad row on purpose: refused by default
        )
        golden.check(f"download_images/{name}.manifest.jsonl", dl / out / "manifest.jsonl", subs)
        golden.check(f"download_images/{out}.files.json", files_listing(dl / out))


def test_seed_data(seed_data, real_bert_dir, image_bn, tmp_path):
    """Real photos and the real bert-base-chinese vocabulary and config (a tiny image
    tower, one text layer, random seeded weights): recall_infer -> recall_eval, and
    build_poi_tables -> rank_eval with the published pic-num table, on the first rows of
    the published recall and val CSVs with the sample photos as their images."""
    golden = Golden(tmp_path)
    shutil.copytree(real_bert_dir, tmp_path / "bert")
    shutil.copyfile(seed_data / "temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy", tmp_path / "pic.npy")
    ranker = tiny_ranker(tmp_path / "bert", seed=3)
    with_recorded_bn(ranker.align_model, image_bn["3"])
    save_ranker_checkpoint(ranker, tmp_path / "ranker.ckpt")
    photos = iter(sorted((seed_data / "sample-images").glob("*.jpg")))
    with open(seed_data / "temp_recall_biztype0_fc5_imagern_500.csv", newline="", encoding="utf-8") as f:
        pois = list(dict.fromkeys(row[0] for row in csv.reader(f)))[:10]
        f.seek(0)
        rows = [row for row in csv.reader(f) if row[0] in pois and int(row[3]) <= 2]  # 20 photos
    write_csv(tmp_path / "recall.csv", rows)
    (tmp_path / "images").mkdir()
    for row in rows:
        shutil.copyfile(next(photos), tmp_path / "images" / f"{row[0]}_{row[3]}.jpg")
    val = (seed_data / "dwd_mml_train_dataset_1007_urls_val_with_poi_tuomin.csv").read_text(encoding="utf-8")
    lines = val.splitlines()[:5]  # the other 10 photos
    (tmp_path / "rank.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in lines:
        for side in "ab":
            shutil.copyfile(next(photos), tmp_path / "images" / f"{line.split(SEP)[0]}_{side}.jpg")

    out = infer(tmp_path, "recall", "--backend", "onnx", checkpoint="ranker.ckpt")
    for f in RECALL_FILES[:3]:
        golden.check(f"seed/recall_infer/{f}", out / f)
    golden.check("seed/recall_infer/top10.csv.meta.json", out / "top10.csv.meta.json")
    run(recall_eval, tmp_path, "--results", "recall/top10.csv", "--k", "1", "5", "--json", "recall/eval.json")
    golden.check("seed/recall_eval/eval.json", out / "eval.json")
    run(
        build_poi_tables,
        tmp_path,
        "--csv",
        "recall.csv",
        "--image-dir",
        "images",
        "--checkpoint",
        "ranker.ckpt",
        "--bert-dir",
        "bert",
        "--out-image-vectors",
        "tables/img.npz",
        "--out-name-vectors",
        "tables/name.npz",
        "--backend",
        "onnx",
        "--device",
        "cpu",
        "--no-progress",
    )
    for f in ("img.npz", "name.npz"):
        golden.check(f"seed/build_poi_tables/{f}", tmp_path / "tables" / f)
    run(
        rank_eval,
        tmp_path,
        "--csv",
        "rank.csv",
        "--image-dir",
        "images",
        "--checkpoint",
        "ranker.ckpt",
        "--bert-dir",
        "bert",
        "--poi-pic-num",
        "pic.npy",
        "--poi-image-vectors",
        "tables/img.npz",
        "--poi-name-vectors",
        "tables/name.npz",
        "--output",
        "rank/scores.csv",
        "--metrics",
        "rank/metrics.json",
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--no-progress",
    )
    for f in ("scores.csv", "metrics.json"):
        golden.check(f"seed/rank_eval/{f}", tmp_path / "rank" / f)
