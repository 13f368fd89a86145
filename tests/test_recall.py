"""Recall stage: metric semantics (SPEC 4) on hand-made tables, checked against
independent computations, both result formats, and recall_infer.py -> recall_eval.py
end to end on a generated gallery with a tiny model, including the embedding cache."""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch
from fixtures import COLORS, solid_image, tiny_align, write_image
from sklearn.metrics import top_k_accuracy_score

import recall_eval
import recall_infer
from models.align import load_tokenizer
from models.checkpoint import save_align_checkpoint
from models.engine.cache import EmbeddingCache
from models.engine.encode import encode_images, encode_texts
from utils.args import Encoding
from utils.evaluation.metrics import (
    evaluate_groups,
    first_hit_ranks,
    recall_at_k,
    stable_topk,
)
from utils.formats.images import load_image
from utils.formats.results import TOPK_HEADER, read_results, write_full
from utils.formats.rows import poi_of_image
from utils.hashing import model_hash


# ---------------------------------------------------------------------------
# metric semantics on hand-made tables
# ---------------------------------------------------------------------------
def test_hand_table_ties_no_hit_and_shared_names():
    groups = {
        # tie at 0.9 between a foreign image listed first and an own image: stable order
        # puts the foreign one first, so the first hit is at rank 2
        "1": [("2_1.jpg", 0.9), ("1_1.jpg", 0.9), ("3_1.jpg", 0.1)],
        # no own image anywhere
        "2": [("1_1.jpg", 0.5), ("3_1.jpg", 0.4), ("3_2.jpg", 0.3)],
        # same name as POI 4 but a different id: only its own id counts
        "3": [("4_1.jpg", 0.8), ("4_2.jpg", 0.7), ("3_9.png", 0.6)],
        "4": [("4_1.jpg", 0.8), ("3_1.jpg", 0.7), ("3_2.jpg", 0.6)],
        # the own image is listed first but with the lower score
        "5": [("5_1", 0.2), ("6_1", 0.3)],
    }
    names = {"1": "a", "2": "b", "3": "same", "4": "same", "5": "c"}
    res = evaluate_groups(groups, ks=(1, 2, 3), names=names)
    firsts = {p.poi_id: p.first_hit for p in res.pois}
    assert firsts == {"1": 2, "2": None, "3": 3, "4": 1, "5": 2}
    assert res.recall == {1: 1 / 5, 2: 3 / 5, 3: 4 / 5}
    assert res.hits == {1: 1, 2: 3, 3: 4}
    assert res.mrr == pytest.approx((1 / 2 + 0 + 1 / 3 + 1 + 1 / 2) / 5)
    assert [p.poi_name for p in res.pois] == ["a", "b", "same", "same", "c"]
    assert res.pois[0].top[0] == ("2_1.jpg", 0.9)


def test_owner_is_file_name_before_first_underscore():
    assert poi_of_image("/x/y/123_4.jpg") == "123"
    assert poi_of_image("123_4_extra.png") == "123"
    res = evaluate_groups({"12": [("123_1.jpg", 1.0), ("12_1.jpg", 0.5)]}, ks=(1,))
    assert res.pois[0].first_hit == 2  # "123" is not "12"


def _brute(scores, qpois, gpois, k):
    hits = 0
    for q in range(len(qpois)):
        order = sorted(range(len(gpois)), key=lambda j: scores[q][j], reverse=True)
        hits += any(gpois[j] == qpois[q] for j in order[:k])
    return hits / len(qpois)


def test_matrix_recall_against_sklearn_one_image_per_poi():
    rng = np.random.default_rng(0)
    n = 40
    scores = rng.normal(size=(n, n))
    qpois = [str(i) for i in range(n)]
    gpois = [str(i) for i in rng.permutation(n)]
    y = [gpois.index(q) for q in qpois]
    for k in (1, 5, 10):
        expected = top_k_accuracy_score(y, scores, k=k, labels=list(range(n)))
        assert recall_at_k(scores, qpois, gpois, [k])[k] == pytest.approx(expected)


def test_matrix_recall_with_ties_against_brute_loop_and_groups():
    rng = np.random.default_rng(1)
    q, n = 30, 120
    # coarse scores: many ties, which must be broken by gallery order
    scores = np.round(rng.normal(size=(q, n)), 1).astype(np.float32)
    qpois = [str(i) for i in range(q)]
    gpois = [str(rng.integers(0, q + 5)) for _ in range(n)]  # some owners are not queries
    ks = (1, 3, 5, 10)
    got = recall_at_k(torch.from_numpy(scores), qpois, gpois, ks)
    for k in ks:
        assert got[k] == pytest.approx(_brute(scores.tolist(), qpois, gpois, k))
    groups = {
        p: [(f"{g}_{j}.jpg", float(s)) for j, (g, s) in enumerate(zip(gpois, row))] for p, row in zip(qpois, scores)
    }
    res = evaluate_groups(groups, ks)
    assert res.recall == pytest.approx(got)
    firsts = first_hit_ranks(scores, qpois, gpois)
    assert firsts == [p.first_hit for p in res.pois]
    assert res.mrr == pytest.approx(sum(1.0 / r for r in firsts if r is not None) / len(firsts))


def test_stable_topk_keeps_column_order_on_ties():
    s = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    vals, idx = stable_topk(s, 4)
    assert idx.tolist() == [[1, 3, 0, 2]]
    py = sorted(range(6), key=lambda j: s[0, j].item(), reverse=True)[:4]
    assert idx[0].tolist() == py


def _write_topk(path, groups, names, k):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TOPK_HEADER)
        for poi, cands in groups.items():
            ranked = sorted(cands, key=lambda c: c[1], reverse=True)[:k]
            for r, (img, s) in enumerate(ranked, 1):
                w.writerow([poi, names[poi], r, img, s])


def _write_full(path, groups, names):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        for poi, cands in groups.items():
            for img, s in cands:
                w.writerow([poi, names[poi], f"imgs/{img}", s])


def test_both_file_formats_give_the_same_figures(tmp_path, capsys):
    rnd = random.Random(3)
    pois = [str(100 + i) for i in range(12)]
    names = {p: f"名字{int(p) % 10}" for p in pois}  # shared names across ids
    gallery = [f"{p}_{r}.jpg" for p in pois for r in range(1, 5)]
    groups = {p: [(g, round(rnd.random(), 2)) for g in gallery] for p in pois}
    _write_full(tmp_path / "full.csv", groups, names)
    _write_topk(tmp_path / "top.csv", groups, names, 10)
    full, top = tmp_path / "full.csv", tmp_path / "top.csv"
    (fmt_f, gf, nf), (fmt_t, gt, nt) = ((r.fmt, r.groups, r.names) for r in map(read_results, (full, top)))
    assert (fmt_f, fmt_t) == ("full", "topk")
    assert nf == nt == names
    rf, rt = evaluate_groups(gf, (1, 5, 10)), evaluate_groups(gt, (1, 5, 10))
    assert rf.recall == rt.recall
    assert [p.first_hit for p in rf.pois if p.hit_at(10)] == [p.first_hit for p in rt.pois if p.hit_at(10)]
    # the scripts print and write the same recall figures
    assert recall_eval.main(["--results", str(tmp_path / "full.csv"), "--k", "1", "5", "10"]) == 0
    out_full = capsys.readouterr().out
    assert recall_eval.main(["--results", str(tmp_path / "top.csv"), "--k", "1", "5", "10"]) == 0
    out_top = capsys.readouterr().out
    lines = lambda s: [x for x in s.splitlines() if x.startswith(("recall@", "POIs"))]  # noqa: E731
    assert lines(out_full) == lines(out_top) and len(lines(out_full)) == 4
    js = json.loads((tmp_path / "top.csv.eval.json").read_text(encoding="utf-8"))
    assert js["n_pois"] == 12 and js["recall"]["5"] == rf.recall[5]
    assert {p["poi_id"] for p in js["pois"]} == set(pois)
    # K beyond the top-k file is an error; the full file can answer it
    assert recall_eval.main(["--results", str(tmp_path / "top.csv"), "--k", "20"]) == 2
    assert recall_eval.main(["--results", str(tmp_path / "full.csv"), "--k", "20"]) == 0


def test_full_output_is_what_csv_writer_writes(tmp_path):
    """write_full quotes each field once, not per row: the bytes are csv.writer's, quoting included."""
    ids, names = ["1", "2,3"], ["plain", 'a "quoted", name']
    images = ["a.jpg", "b,c.jpg", 'd"e.jpg']
    scores = np.array([[0.5, -1e-7, 1 / 3], [2.0, 0.0, 1e9]], dtype=np.float32)
    write_full(tmp_path / "full.csv", ids, names, images, scores)
    with open(tmp_path / "ref.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        for poi, name, row in zip(ids, names, scores):
            w.writerows((poi, name, image, f"{s:.9g}") for image, s in zip(images, row.tolist()))
    assert (tmp_path / "full.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()
    assert read_results(tmp_path / "full.csv").groups["2,3"][1] == ("b,c.jpg", 0.0)


def test_bad_results_files_are_named(tmp_path, capsys):
    p = tmp_path / "bad.csv"
    p.write_text("1,a,1_1.jpg,0.5\n1,a,1_2.jpg,notanumber\n", encoding="utf-8")
    assert recall_eval.main(["--results", str(p)]) == 2
    err = capsys.readouterr().err  # the one-line error of utils.cli.entry_point
    assert "bad.csv:2" in err and "notanumber" in err


# ---------------------------------------------------------------------------
# end to end with a tiny model
# ---------------------------------------------------------------------------
NAMES = {
    "101": "红色圆",
    "102": "蓝色方",
    "103": "绿色山",
    "104": "红色圆",
    "105": "黄色海",
    "106": "紫色塔",
    "107": "白色桥",
}
COLOR_OF = {"101": "红", "102": "蓝", "103": "绿", "104": "橙", "105": "黄", "106": "紫", "107": "白"}


def _tiny_model(bert_dir):
    m = tiny_align(bert_dir, seed=1)
    with torch.no_grad():  # without biases the tiny random model's scores depend on the inputs
        m.image_hidden_layer.bias.zero_()
        m.text_hidden_layer.bias.zero_()
        m.image_model._fc.bias.zero_()
    return m


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, bert_dir):
    d = tmp_path_factory.mktemp("recall")
    img = d / "images"
    rows = []
    for pid, name in NAMES.items():
        for r in range(1, 5):
            rows.append([pid, name, f"https://example.invalid/{pid}_{r}", r, 96, 64, 1])
            if (pid, r) == ("105", 4):
                continue  # missing on disk
            ext = ".png" if r == 2 else ".jpg"
            write_image(
                solid_image(
                    COLORS[COLOR_OF[pid]], size=(96 + 8 * r, 64), shape="圆" if r % 2 else "方", seed=int(pid) * 10 + r
                ),
                img / f"{pid}_{r}{ext}",
            )
    (img / "103_3.jpg").unlink()
    (img / "103_3.jpg").write_bytes(b"not an image")  # present but unreadable
    (img / "107_9.jpg.part").write_bytes(b"partial download")  # ignored
    with open(d / "recall.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    model = _tiny_model(bert_dir)
    save_align_checkpoint(model, d / "tiny.pth")
    return {"dir": d, "images": img, "csv": d / "recall.csv", "ckpt": d / "tiny.pth", "model": model}


def _infer(g, bert_dir, out, *extra):
    argv = [
        "--csv",
        str(g["csv"]),
        "--image-dir",
        str(g["images"]),
        "--checkpoint",
        str(g["ckpt"]),
        "--bert-dir",
        str(bert_dir),
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]
    assert recall_infer.main(argv) == 0
    return json.loads(open(f"{out}.meta.json", encoding="utf-8").read())


def _read_full(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [(p, n, img, float(s)) for p, n, img, s in csv.reader(f)]


def test_end_to_end_infer_then_eval(gallery, bert_dir, tmp_path, capsys):
    g = gallery
    out = tmp_path / "top.csv"
    cache = tmp_path / "cache"
    meta = _infer(
        g,
        bert_dir,
        out,
        "--topk",
        "5",
        "--full-output",
        str(tmp_path / "full.csv"),
        "--cache-dir",
        str(cache),
        "--num-workers",
        "1",
    )
    n_rows, n_pois = 28, 7
    assert meta["rows"] == n_rows and meta["n_pois"] == n_pois
    assert meta["missing_on_disk"] == 1 and meta["unreadable"] == 1
    assert meta["gallery_size"] == n_rows - 1  # missing left out, unreadable kept as zero image
    assert meta["images_encoded"] == n_rows - 1 and meta["images_cached"] == 0
    listing = (tmp_path / "top.csv.missing.tsv").read_text(encoding="utf-8").splitlines()
    assert listing[0].split("\t")[0] == "status"
    assert sorted(x.split("\t")[0] + ":" + x.split("\t")[1] for x in listing[1:]) == [
        "missing:105_4",
        "unreadable:103_3",
    ]

    # top-k file: header, 5 rows per POI, ranks 1..5, descending scores
    with open(out, newline="", encoding="utf-8") as f:
        top = list(csv.reader(f))
    assert top[0] == list(TOPK_HEADER)
    assert len(top) == 1 + n_pois * 5
    by_poi = {}
    for p, n, r, img, s in top[1:]:
        by_poi.setdefault(p, []).append((int(r), img, float(s)))
        assert n == NAMES[p]
    assert all([r for r, _, _ in v] == [1, 2, 3, 4, 5] for v in by_poi.values())
    assert all(v[i][2] >= v[i + 1][2] for v in by_poi.values() for i in range(4))

    # full file: every (POI, image) once; scores equal an independent computation
    full = _read_full(tmp_path / "full.csv")
    assert len(full) == n_pois * (n_rows - 1)
    images = list(dict.fromkeys(img for _, _, img, _ in full))
    model, tok = g["model"], load_tokenizer(bert_dir)
    with torch.inference_mode():
        xs = torch.stack([load_image(p)[0] for p in images])
        ie = model.encode_image(xs)
        te = torch.cat([model.encode_text(**_tok1(tok, NAMES[p])) for p in NAMES])
    ref = (te @ ie.T).numpy()
    got = np.array([s for _, _, _, s in full]).reshape(n_pois, -1)
    assert np.abs(got - ref).max() < 1e-5
    assert ref.std() > 0.01  # the comparison is not trivial

    # the top-k file is the head of each POI's stably sorted full row
    for qi, p in enumerate(NAMES):
        order = sorted(range(len(images)), key=lambda j: got[qi, j], reverse=True)[:5]
        assert [img for _, img, _ in by_poi[p]] == [images[j].rsplit("/", 1)[-1] for j in order]

    # the evaluator on both files agrees with recall_at_k on the independent scores
    gpois = [poi_of_image(i) for i in images]
    expect = recall_at_k(got, list(NAMES), gpois, (1, 5))
    for res_file in (out, tmp_path / "full.csv"):
        assert recall_eval.main(["--results", str(res_file), "--k", "1", "5"]) == 0
        printed = capsys.readouterr().out
        for k in (1, 5):
            assert f"recall@{k}: {expect[k]:.4f}" in printed
        assert "POIs: 7" in printed
    assert recall_eval.main(["--results", str(out), "--k", "10"]) == 2

    # rerun with the cache: nothing encoded, identical output
    meta2 = _infer(g, bert_dir, tmp_path / "top2.csv", "--topk", "5", "--cache-dir", str(cache), "--num-workers", "0")
    assert meta2["images_encoded"] == 0 and meta2["images_cached"] == n_rows - 1
    assert (tmp_path / "top2.csv").read_text(encoding="utf-8") == out.read_text(encoding="utf-8")

    # --skip-missing drops the unreadable image too
    meta3 = _infer(
        g, bert_dir, tmp_path / "top3.csv", "--skip-missing", "--cache-dir", str(cache), "--num-workers", "0"
    )
    assert meta3["gallery_size"] == n_rows - 2 and meta3["unreadable_policy"] == "dropped"
    with open(tmp_path / "top3.csv", newline="", encoding="utf-8") as f:
        assert "103_3.jpg" not in {r[3] for r in csv.reader(f)}


def _tok1(tok, text):
    enc = tok([text], return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_safetensors_checkpoint_gives_the_same_outputs(gallery, bert_dir, tmp_path):
    """convert_weights.py: the .safetensors file scores exactly as the .pth it came from."""
    import convert_weights

    st = tmp_path / "tiny.safetensors"
    assert convert_weights.main([str(gallery["ckpt"]), str(st)]) == 0
    outs = {}
    for name, ckpt in (("pth", gallery["ckpt"]), ("st", st)):
        extra = ("--full-output", str(tmp_path / f"{name}.full.csv"), "--backend", "torch", "--num-workers", "0")
        meta = _infer({**gallery, "ckpt": ckpt}, bert_dir, tmp_path / f"{name}.csv", *extra)
        outs[name] = ((tmp_path / f"{name}.csv").read_bytes(), (tmp_path / f"{name}.full.csv").read_bytes())
        outs[name + ".identity"] = meta["model_identity"]
    assert outs["st"] == outs["pth"] and outs["st.identity"] == outs["pth.identity"]


def test_infer_bad_inputs_are_reported(gallery, bert_dir, tmp_path, caplog, capsys):
    g = gallery
    bad = tmp_path / "bad.csv"
    bad.write_text("1,a,http://x,1,2,3\n", encoding="utf-8")
    base = [
        "--image-dir",
        str(g["images"]),
        "--checkpoint",
        str(g["ckpt"]),
        "--bert-dir",
        str(bert_dir),
        "--output",
        str(tmp_path / "o.csv"),
        "--no-progress",
    ]
    with caplog.at_level(logging.ERROR):
        assert recall_infer.main(["--csv", str(bad), *base]) == 2
    assert "bad.csv:1" in caplog.text
    caplog.clear()
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    capsys.readouterr()
    assert recall_infer.main(["--csv", str(g["csv"]), "--image-dir", str(empty), *base[2:]]) == 2
    assert "101_1" in capsys.readouterr().err  # the one-line error of utils.cli.entry_point


# ---------------------------------------------------------------------------
# cache and encoding helpers
# ---------------------------------------------------------------------------
def test_cache_is_content_keyed_robust_and_namespaced(gallery, tmp_path, caplog):
    model = gallery["model"]
    srcs = sorted(p for p in gallery["images"].iterdir() if p.suffix == ".jpg")[:6]
    tag = f"align:{model_hash(model)}"  # what RecallModel.identity() gives for this model
    cache = EmbeddingCache(tmp_path / "c", tag)
    s1 = {}
    e1, ok1 = encode_images(model, srcs, Encoding(batch_size=4, num_workers=0, progress=False), cache=cache, stats=s1)
    assert s1["encoded"] == 6 and s1["cached"] == 0
    # a renamed copy hits by content; the untouched files are recognised by stat alone
    shutil.copy(srcs[0], tmp_path / "renamed.jpg")
    s2 = {}
    hashed = cache.hashed
    e2, _ = encode_images(
        model,
        [*srcs, tmp_path / "renamed.jpg"],
        Encoding(batch_size=4, num_workers=0, progress=False),
        cache=cache,
        stats=s2,
    )
    assert s2["encoded"] == 0 and s2["cached"] == 7
    assert cache.hashed == hashed + 1
    assert torch.equal(e2[:6], e1) and torch.equal(e2[6], e1[0])
    # another preprocessing mode or precision is another key
    s3 = {}
    encode_images(
        model, srcs[:2], Encoding(batch_size=4, preprocess="fast", num_workers=0, progress=False), cache=cache, stats=s3
    )
    assert s3["encoded"] == 2
    cache.close()
    # another model kind (or other weights) does not see these vectors
    other = EmbeddingCache(tmp_path / "c", "taiyi:" + "0" * 64)
    assert other.get_many(other.content_keys(srcs), other.namespace("reference", "fp32")) == {}
    other.close()
    # a corrupt cache file is moved aside with a warning, and the run goes on
    (tmp_path / "c" / "embeddings.sqlite").write_bytes(b"this is not sqlite" * 100)
    with caplog.at_level(logging.WARNING):
        broken = EmbeddingCache(tmp_path / "c", tag)
        s4 = {}
        e4, _ = encode_images(
            model, srcs, Encoding(batch_size=4, num_workers=0, progress=False), cache=broken, stats=s4
        )
    assert "not a readable cache" in caplog.text
    assert broken.db is not None and s4["encoded"] == 6
    assert torch.allclose(e4, e1, atol=1e-6)
    assert list((tmp_path / "c").glob("embeddings.sqlite.corrupt-*"))


def test_encode_texts_encodes_each_distinct_string_once(gallery, bert_dir):
    model = gallery["model"]
    tok = load_tokenizer(bert_dir)
    seen = []
    orig = model.encode_text

    def counting(input_ids, attention_mask, normalize=True):
        seen.append(input_ids.shape[0])
        return orig(input_ids, attention_mask, normalize)

    model.encode_text = counting
    try:
        texts = ["红色圆", "蓝色方", "红色圆", "绿色山公园古镇", "蓝色方", "红色圆"]
        emb = encode_texts(model, tok, texts, Encoding(text_batch_size=2))
    finally:
        del model.encode_text
    assert sum(seen) == 3 and max(seen) <= 2
    assert emb.shape == (6, 32)
    assert torch.equal(emb[0], emb[2]) and torch.equal(emb[1], emb[4])
    with torch.inference_mode():
        one = model.encode_text(**_tok1(tok, "绿色山公园古镇"))[0]
    assert torch.allclose(emb[3], one, atol=1e-6)
    assert torch.allclose(emb.norm(dim=1), torch.ones(6), atol=1e-5)


# ---------------------------------------------------------------------------
# --save-embeddings -> recall_eval.py --embeddings: the same figures as the full file
# ---------------------------------------------------------------------------
def test_saved_embeddings_give_the_figures_of_the_full_file(gallery, bert_dir, tmp_path, capsys):
    from utils.formats.results import load_embeddings

    g = gallery
    out, full, npz = tmp_path / "top.csv", tmp_path / "full.csv", tmp_path / "run.npz"
    meta = _infer(
        g, bert_dir, out, "--topk", "5", "--full-output", str(full), "--save-embeddings", str(npz), "--num-workers", "0"
    )
    d = load_embeddings(npz)
    assert d["image_emb"].shape == (meta["gallery_size"], 32) and d["text_emb"].shape == (7, 32)
    assert d["poi_ids"] == list(NAMES) and d["poi_names"] == list(NAMES.values())
    assert d["image_names"] == list(dict.fromkeys(img.rsplit("/", 1)[-1] for _, _, img, _ in _read_full(full)))
    assert d["image_ok"].sum() == meta["gallery_size"] - 1  # the unreadable one
    assert d["meta"]["model_identity"].startswith("align:")
    # the vectors give back the scores of the full file
    got = np.array([s for _, _, _, s in _read_full(full)]).reshape(7, -1)
    assert np.abs(d["text_emb"] @ d["image_emb"].T - got).max() < 1e-6
    printed = {}
    for flag, path in (("--results", full), ("--embeddings", npz)):
        assert (
            recall_eval.main(
                [
                    flag,
                    str(path),
                    "--k",
                    "1",
                    "5",
                    "10",
                    "--bootstrap",
                    "200",
                    "--json",
                    str(tmp_path / f"{path.name}.json"),
                ]
            )
            == 0
        )
        printed[flag] = [x for x in capsys.readouterr().out.splitlines() if x.startswith(("recall@", "MRR", "POIs"))]
    assert printed["--results"] == printed["--embeddings"] and len(printed["--results"]) == 5
    a = json.loads((tmp_path / "full.csv.json").read_text(encoding="utf-8"))
    b = json.loads((tmp_path / "run.npz.json").read_text(encoding="utf-8"))
    assert a["recall"] == b["recall"] and a["mrr"] == b["mrr"] and a["recall_ci"] == b["recall_ci"]
    assert [p["first_hit_rank"] for p in a["pois"]] == [p["first_hit_rank"] for p in b["pois"]]


def test_non_utf8_rank_csv_is_reported_at_its_line(tmp_path):
    from utils.cli import DataError

    from utils.formats.rows import RECORD_SEP, iter_rank_csv

    good = RECORD_SEP.join(["1", "http://a", "http://b", "2", "1", "t", "c", "", "", "P"])
    p = tmp_path / "r.csv"
    p.write_bytes((good + "\n" + good.replace("1", "2", 1) + "\n").encode() + b"3\xff" + b"\n")
    errors = []
    assert len(list(iter_rank_csv(p, errors))) == 2
    assert [(e.line, "not UTF-8" in e.message) for e in errors] == [(3, True)]
    with pytest.raises(DataError, match=r"r\.csv:3: not UTF-8"):
        list(iter_rank_csv(p))
    nan = tmp_path / "nan.csv"
    nan.write_text(good.replace("$record$2$record$", "$record$nan$record$", 1) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"nan\.csv:1: ctr_a: nan is not a finite number"):
        list(iter_rank_csv(nan))
    with pytest.raises(DataError, match=r"nan\.csv:1: ctr_a: nan is not a finite number"):
        list(iter_rank_csv(nan, []))  # never a row to skip: an error even when rows are collected
