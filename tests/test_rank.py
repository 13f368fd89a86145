"""Ranking stage: item inputs (SPEC section 5), pairwise metrics, rank_eval.py end to end."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from fixtures import calibrate_image_bn, solid_image, tiny_align, tiny_ranker, write_image
from sklearn.metrics import log_loss, roc_auc_score

import rank_eval
from models.align import load_tokenizer
from models.checkpoint import save_align_checkpoint, save_ranker_checkpoint
from models.engine.encode import tokenize
from utils.evaluation.metrics import pairwise_metrics
from utils.formats.images import ZERO_TENSOR, load_image
from utils.formats.poi import PoiTables, poi_sequence, save_tables
from utils.formats.rows import RECORD_SEP, iter_rank_csv

DIM = 4


def _vecs(names, dim=DIM, offset=0.0):
    return {n: np.full(dim, i + 1 + offset, dtype=np.float32) for i, n in enumerate(names)}


# ---------------------------------------------------------------------------
# input construction
# ---------------------------------------------------------------------------
def test_poi_sort_by_weight():
    pic = {"A": [1, 0, 0], "B": [0, 1, 0], "C": [0, 0, 1], "D": [4, 0, 0]}  # 1, 5, 3, 4
    assert poi_sequence("A,B,C,D", pic) == ["B", "D", "C", "A"]
    # weight n0 + 5 n1 + 3 n2, not any single count
    pic2 = {"x": [10, 0, 0], "y": [0, 2, 0], "z": [0, 0, 4]}  # 10, 10, 12
    assert poi_sequence("x,y,z", pic2) == ["z", "x", "y"]


def test_poi_sort_ties_are_stable_and_unknown_weigh_zero():
    pic = {"K": [2, 0, 0], "L": [0, 0, 0]}
    assert poi_sequence("U1,L,K,U2", pic) == ["K", "U1", "L", "U2"]
    assert poi_sequence("c,b,a", {}) == ["c", "b", "a"]
    pic_eq = {"p": [5, 0, 0], "q": [0, 1, 0], "r": [2, 0, 1]}  # all weigh 5
    assert poi_sequence("r,p,q", pic_eq) == ["r", "p", "q"]


def test_more_than_five_pois_keeps_the_five_heaviest():
    names = [f"p{i}" for i in range(8)]
    pic = {n: [i, 0, 0] for i, n in enumerate(names)}
    img, txt = _vecs(names), _vecs(names, offset=100)
    inp = PoiTables(pic, img, txt, DIM).inputs("t", ",".join(names))
    assert inp.poi_names == ["p7", "p6", "p5", "p4", "p3"] and inp.poi_len == 5
    np.testing.assert_array_equal(inp.poi_img[:, 0], [8, 7, 6, 5, 4])
    np.testing.assert_array_equal(inp.poi_txt[:, 0], [108, 107, 106, 105, 104])
    assert inp.pois_text == ",".join(names)


def test_unknown_pois_get_zero_vectors_but_count():
    pic = {"A": [0, 1, 0]}
    img = {"A": np.ones(DIM), "B": np.full(DIM, 2.0)}
    txt = {"A": np.full(DIM, 3.0)}
    inp = PoiTables(pic, img, txt, DIM).inputs("title", "Z,B,A")
    assert inp.poi_names == ["A", "Z", "B"] and inp.poi_len == 3
    np.testing.assert_array_equal(inp.poi_img[:, 0], [1, 0, 2, 0, 0])
    np.testing.assert_array_equal(inp.poi_txt[:, 0], [3, 0, 0, 0, 0])
    assert inp.unknown == ["Z", "B"]
    assert inp.poi_img.dtype == np.float32 and inp.poi_img.shape == (5, DIM)


@pytest.mark.parametrize(
    "poi_names,seq,text",
    [
        ("", [], "the title"),
        ("   ", [], "the title"),  # strip() empty: title is the text (< 1 rule)
        ("a", [], "a"),  # one character: no sequence (<= 1 rule), but its own text
        (" a ", [], " a "),
        ("ab", ["ab"], "ab"),
        (",", [], ","),
    ],
)
def test_blank_and_one_character_poi_names(poi_names, seq, text):
    inp = PoiTables({}, {}, {}, DIM).inputs("the title", poi_names)
    assert inp.poi_names == seq and inp.poi_len == len(seq) and inp.pois_text == text
    if not seq:
        assert not inp.poi_img.any() and not inp.poi_txt.any()


def test_spaces_around_commas():
    """Weights are looked up by the stripped name, vectors by the unstripped one."""
    pic = {"A": [1, 0, 0], "B": [9, 0, 0]}
    img = {"A": np.ones(DIM), "B": np.full(DIM, 2.0), " B": np.full(DIM, 5.0)}
    txt = {"A ": np.full(DIM, 7.0), "B": np.full(DIM, 3.0)}
    inp = PoiTables(pic, img, txt, DIM).inputs("t", "A , B")
    assert inp.poi_names == [" B", "A "]  # B is heavier (found stripped)
    np.testing.assert_array_equal(inp.poi_img[:2, 0], [5, 0])  # " B" found, "A " not
    np.testing.assert_array_equal(inp.poi_txt[:2, 0], [0, 7])  # " B" not found, "A " found
    assert inp.pois_text == "A , B"


def test_record_line_is_stripped_before_splitting(tmp_path):
    """The authors strip the whole record, so the last POI name loses trailing spaces
    while inner names keep theirs."""
    fields = ["42", "http://a", "http://b", "2", "1", "标题", "cate", "http://oa", "http://ob", "A , B  "]
    p = tmp_path / "r.csv"
    p.write_text(RECORD_SEP.join(fields) + "  \n", encoding="utf-8")
    (row,) = list(iter_rank_csv(p))
    assert row.poi_names == "A , B" and row.label == 1
    inp = PoiTables({"B": [1, 0, 0]}, {"B": np.ones(DIM)}, {}, DIM).inputs(row.title, row.poi_names)
    assert inp.poi_names == [" B", "A "]


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------
def test_pairwise_metrics_against_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s_a = rng.normal(size=300) + 0.7 * y
    s_b = rng.normal(size=300)
    s_b[:7] = s_a[:7]  # ties predict 0
    m = pairwise_metrics(y, s_a, s_b)
    p = 1 / (1 + np.exp(-(s_a - s_b)))
    assert m["n"] == 300 and m["ties"] == 7
    assert m["accuracy"] == pytest.approx(np.mean((s_a > s_b).astype(int) == y))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["log_loss"] == pytest.approx(log_loss(y, p), rel=1e-9)
    assert m["baseline"] == pytest.approx(max(y.mean(), 1 - y.mean()))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_sklearn_with_many_ties(seed):
    from utils.evaluation.metrics import roc_auc

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = rng.integers(0, 2, n)
    y[0], y[-1] = 0, 1
    s = rng.integers(-3, 4, n).astype(float) * rng.choice([1.0, 0.5])  # few distinct values
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert roc_auc(y, np.zeros(n)) == 0.5 and roc_auc(np.ones(n), s) is None
    assert roc_auc([], []) is None  # no pairs: no class at all


def test_pairwise_metrics_known_table():
    y = [1, 0, 1, 0]
    s_a = [2.0, 0.0, 0.0, 1.0]
    s_b = [0.0, 1.0, 0.5, 0.0]
    m = pairwise_metrics(y, s_a, s_b)
    assert m["accuracy"] == 0.5  # pairs 1 and 2 right
    assert m["auc"] == pytest.approx(roc_auc_score(y, [2, -1, -0.5, 1]))
    assert m["auc"] == 0.75
    assert m["baseline"] == 0.5
    # large margins: no overflow, exact loss of a confident mistake
    big = pairwise_metrics([0, 1], [800.0, 0.0], [0.0, 0.0])
    assert big["log_loss"] == pytest.approx((800 + np.log(2)) / 2)
    assert pairwise_metrics([1, 1], [1, 2], [0, 0])["auc"] is None
    with pytest.raises(ValueError, match="length"):
        pairwise_metrics([1], [1, 2], [0, 0])


# ---------------------------------------------------------------------------
# rank_eval.py end to end on a tiny ranker
# ---------------------------------------------------------------------------
POI_NAMES = ["西湖", "灵隐寺", "古镇", "乐园", "山", "海", "塔"]
COLORS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 220, 20), (10, 10, 10), (150, 40, 200)]

# item_id, ctr_a, ctr_b, title, poi_names, image a, image b ("missing" / "broken" / shape)
ROWS = [
    ("101", 2, 1, "西湖一日游", "灵隐寺,西湖,古镇", "圆", "方"),
    ("102", 1, 2, "北京长城", "", None, "圆"),
    ("103", 2, 1, "上海乐园", "山,海,塔,乐园,古镇,西湖,灵隐寺", "方", None),  # > 5 POIs
    ("104", 1, 2, "大小岛", "未知地,西湖", "圆", "missing"),  # unknown POI; b missing
    ("105", 1, 2, "古城", "a", None, "broken"),  # one char; b unreadable
    ("106", 2, 1, "三角塔", "塔 , 山", "方", "圆"),  # spaces around commas
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bert_dir):
    tmp = tmp_path_factory.mktemp("rank")
    model = tiny_ranker(bert_dir, seed=5)
    calibrate_image_bn(
        model.align_model, [solid_image(c, shape=sh, seed=i) for i, c in enumerate(COLORS) for sh in ("圆", "方", None)]
    )
    ckpt = tmp / "ranker.ckpt"
    save_ranker_checkpoint(model, ckpt)
    dim = model.align_model.arch.embed_dim
    rng = np.random.default_rng(1)
    pic = {n: [int(x) for x in rng.integers(0, 20, 3)] for n in POI_NAMES}
    img_t = {n: rng.normal(size=dim).astype(np.float32) for n in POI_NAMES}
    name_t = {n: rng.normal(size=dim).astype(np.float32) for n in POI_NAMES}
    img_t[" 山"] = rng.normal(size=dim).astype(np.float32)  # only the unstripped name in one table
    paths = {"pic": tmp / "pic.npy", "img": tmp / "img.npz", "name": tmp / "name.npy"}
    np.save(paths["pic"], pic, allow_pickle=True)  # published pickled-dict format
    save_tables({paths["img"]: img_t})  # safe format
    np.save(paths["name"], name_t, allow_pickle=True)

    img_dir = tmp / "images"
    img_dir.mkdir()
    lines = []
    for k, (item, ca, cb, title, pois, a, b) in enumerate(ROWS):
        for side, shape in (("a", a), ("b", b)):
            if shape == "missing":
                continue
            if shape == "broken":
                (img_dir / f"{item}_{side}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
                continue
            ext = ".jpg" if side == "a" else ".png"
            write_image(
                solid_image(COLORS[(k + (side == "b")) % 6], size=(80 + 9 * k, 60), shape=shape, seed=k),
                img_dir / f"{item}_{side}{ext}",
            )
        lines.append(
            RECORD_SEP.join(
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
    csv_path = tmp / "val.csv"
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dict(
        tmp=tmp,
        model=model,
        ckpt=ckpt,
        pic=pic,
        img_t=img_t,
        name_t=name_t,
        paths=paths,
        img_dir=img_dir,
        csv=csv_path,
        bert_dir=bert_dir,
    )


def _args(s, *extra):
    return [
        "--csv",
        str(s["csv"]),
        "--image-dir",
        str(s["img_dir"]),
        "--checkpoint",
        str(s["ckpt"]),
        "--bert-dir",
        str(s["bert_dir"]),
        "--poi-pic-num",
        str(s["paths"]["pic"]),
        "--poi-image-vectors",
        str(s["paths"]["img"]),
        "--poi-name-vectors",
        str(s["paths"]["name"]),
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
        "--batch-size",
        "3",
        "--text-batch-size",
        "2",
        "--head-batch-size",
        "4",
        *extra,
    ]


# hand-made POI sequences (SPEC rules applied by hand) for the direct computation
def _expected_sequence(pois, pic):
    if len(pois.strip()) <= 1:
        return []
    names = pois.split(",")
    w = [(-(lambda n: n[0] + 5 * n[1] + 3 * n[2])(pic.get(x.strip(), [0, 0, 0])), i, x) for i, x in enumerate(names)]
    return [x for _, _, x in sorted(w)][:5]


def _direct_scores(s, model, rows=ROWS):
    """Score every row with the full forward pass of the model (no caching, no batching
    of pairs), building inputs by hand."""
    tok = load_tokenizer(s["bert_dir"])
    dim = model.align_model.arch.embed_dim
    out = {}
    with torch.no_grad():
        for item, ca, cb, title, pois, _a, _b in rows:
            text = pois if pois.strip() else title
            enc = tokenize(tok, [text])
            feat = model.align_model.encode_text(enc["input_ids"], enc["attention_mask"])
            seq = _expected_sequence(pois, s["pic"])
            pimg = torch.zeros(1, 5, dim)
            ptxt = torch.zeros(1, 5, dim)
            for i, n in enumerate(seq):
                if n in s["img_t"]:
                    pimg[0, i] = torch.from_numpy(s["img_t"][n])
                if n in s["name_t"]:
                    ptxt[0, i] = torch.from_numpy(s["name_t"][n])
            scores = []
            for side in ("a", "b"):
                files = list(s["img_dir"].glob(f"{item}_{side}.*"))
                x = load_image(files[0])[0] if files else ZERO_TENSOR
                scores.append(float(model(x[None], feat, pimg, ptxt, torch.tensor([len(seq)]))))
            out[item] = (int(ca > cb), *scores)
    return out


def _read_output(path):
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["item_id", "label", "s_a", "s_b", "prediction"]
    return {r[0]: (int(r[1]), float(r[2]), float(r[3]), int(r[4])) for r in rows[1:]}


def test_rank_eval_end_to_end_matches_direct_computation(setup, capsys):
    s = setup
    out, met = s["tmp"] / "scores.csv", s["tmp"] / "metrics.json"
    assert rank_eval.main(_args(s, "--output", str(out), "--metrics", str(met))) == 0
    printed = capsys.readouterr().out
    got = _read_output(out)
    expected = _direct_scores(s, s["model"])
    assert list(got) == [r[0] for r in ROWS]
    for item, (label, ea, eb) in expected.items():
        g = got[item]
        assert g[0] == label
        assert g[1] == pytest.approx(ea, abs=1e-5) and g[2] == pytest.approx(eb, abs=1e-5)
        assert g[3] == int(g[1] > g[2])
    # the inputs really reach the model: items differ, and the two images of a pair differ
    assert len({v[1] for v in got.values()}) == len(ROWS)
    assert all(v[1] != v[2] for v in got.values())

    m = json.loads(met.read_text(encoding="utf-8"))
    labels = [v[0] for v in expected.values()]
    ref = pairwise_metrics(labels, [got[k][1] for k in got], [got[k][2] for k in got])
    for key in ("accuracy", "auc", "log_loss", "baseline"):
        assert m[key] == pytest.approx(ref[key])
    assert m["n"] == m["pairs_scored"] == 6 and m["pairs_in_csv"] == 6
    assert m["pairs_without_pois"] == 2  # "" and "a"
    assert m["images_missing"] == 1 and m["images_unreadable"] == 1
    assert m["pairs_with_missing_image"] == 2 and m["pairs_skipped"] == 0
    assert m["pairs_with_unknown_poi"] == 2  # 104 (未知地), 106 ("塔 ", " 山")
    assert "pairwise accuracy" in printed and f"{m['accuracy']:.4f}" in printed
    assert "pairs with a missing or unreadable image: 2 (scored with the zero image)" in printed
    assert "pairs without POIs: 2" in printed


def test_rank_eval_skip_missing(setup, capsys):
    s = setup
    out, met = s["tmp"] / "skip.csv", s["tmp"] / "skip.json"
    assert rank_eval.main(_args(s, "--skip-missing", "--output", str(out), "--metrics", str(met))) == 0
    printed = capsys.readouterr().out
    got = _read_output(out)
    assert list(got) == ["101", "102", "103", "106"]
    full = _read_output(s["tmp"] / "scores.csv") if (s["tmp"] / "scores.csv").exists() else None
    if full:
        for k in got:
            assert got[k] == pytest.approx(full[k])
    m = json.loads(met.read_text(encoding="utf-8"))
    assert m["pairs_scored"] == 4 and m["pairs_skipped"] == 2 and m["n"] == 4
    assert "(left out: 2)" in printed


def test_rank_eval_align_checkpoint_override(setup):
    s = setup
    other = calibrate_image_bn(
        tiny_align(s["bert_dir"], seed=11), [solid_image(c, shape="圆", seed=i) for i, c in enumerate(COLORS)]
    )
    apath = s["tmp"] / "other_align.pth"
    save_align_checkpoint(other, apath)
    out = s["tmp"] / "override.csv"
    assert rank_eval.main(_args(s, "--align-checkpoint", str(apath), "--output", str(out), "--limit", "2")) == 0
    got = _read_output(out)
    model = tiny_ranker(s["bert_dir"], seed=5)
    model.align_model.load_state_dict(other.state_dict())
    expected = _direct_scores(s, model.eval(), ROWS[:2])
    assert list(got) == ["101", "102"]
    for k in got:
        assert got[k][1] == pytest.approx(expected[k][1], abs=1e-5)
        assert got[k][2] == pytest.approx(expected[k][2], abs=1e-5)


def test_rank_eval_bad_inputs(setup, tmp_path, capsys):
    s = setup
    evil = tmp_path / "evil.npy"
    np.save(evil, {"x": np.array([eval], dtype=object)}, allow_pickle=True)
    args = _args(s)
    args[args.index("--poi-pic-num") + 1] = str(evil)
    assert rank_eval.main(args) == 2
    err = capsys.readouterr().err
    assert "--poi-pic-num" in err and "evil.npy" in err and "builtins.eval" in err

    wrong_dim = tmp_path / "wrong.npz"
    save_tables({wrong_dim: {"西湖": np.ones(7, dtype=np.float32)}})
    args = _args(s)
    args[args.index("--poi-image-vectors") + 1] = str(wrong_dim)
    assert rank_eval.main(args) == 2
    assert "7 values" in capsys.readouterr().err

    args = _args(s)
    args[args.index("--csv") + 1] = str(tmp_path / "absent.csv")
    assert rank_eval.main(args) == 2
    assert "absent.csv" in capsys.readouterr().err


def test_real_val_csv_inputs(seed_data):
    """The published val set through the input rules: 1000 pairs, 451 label-1, 295 without
    POIs, and the real pic-num table (restricted loader) ordering the rest."""
    from utils.formats.poi import load_poi_table
    from utils.formats.rows import iter_rank_csv

    csv_path = seed_data / "dwd_mml_train_dataset_1007_urls_val_with_poi_tuomin.csv"
    pic_path = seed_data / "temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy"
    if not csv_path.is_file() or not pic_path.is_file():
        pytest.skip("val CSV or pic-num table absent from the seed data")
    rows = list(iter_rank_csv(csv_path))
    pic = load_poi_table(pic_path)
    assert len(rows) == 1000 and sum(r.label for r in rows) == 451
    inputs = [PoiTables(pic, {}, {}, 8).inputs(r.title, r.poi_names) for r in rows]
    assert sum(i.poi_len == 0 for i in inputs) == 295
    assert max(i.poi_len for i in inputs) == 5
    assert pairwise_metrics([r.label for r in rows], np.zeros(1000), np.ones(1000))["baseline"] == pytest.approx(0.549)
    for r, i in zip(rows, inputs):
        w = [-(lambda c: c[0] + 5 * c[1] + 3 * c[2])(pic.get(n.strip(), [0, 0, 0])) for n in i.poi_names]
        assert w == sorted(w)  # heaviest first
        assert i.pois_text == (r.poi_names if r.poi_names.strip() else r.title)


def test_rank_eval_encodes_each_image_and_text_once_and_backends_agree(setup, monkeypatch):
    """Issue 13: one batched encode of the distinct files (one stand-in for all missing
    files), one of the distinct texts, the head through score_many; torch and the default
    engine give the same scores."""
    from models.engine.recall_model import RecallModel
    from models.ranker import SiameseRanker

    s = setup
    calls = {"images": [], "texts": [], "head": 0}
    enc_i, enc_t, many = RecallModel.encode_images, RecallModel.encode_texts, SiameseRanker.score_many

    def spy_images(self, paths, *a, **k):
        calls["images"].append(list(paths))
        return enc_i(self, paths, *a, **k)

    def spy_texts(self, texts, *a, **k):
        calls["texts"].append(list(texts))
        return enc_t(self, texts, *a, **k)

    def spy_head(self, *a, **k):
        calls["head"] += 1
        return many(self, *a, **k)

    monkeypatch.setattr(RecallModel, "encode_images", spy_images)
    monkeypatch.setattr(RecallModel, "encode_texts", spy_texts)
    monkeypatch.setattr(SiameseRanker, "score_many", spy_head)
    outs = {}
    for backend in ("torch", "auto"):
        calls["images"].clear(), calls["texts"].clear()
        out, met = s["tmp"] / f"b_{backend}.csv", s["tmp"] / f"b_{backend}.json"
        assert (
            rank_eval.main(
                _args(s, "--backend", backend, "--output", str(out), "--metrics", str(met), "--head-batch-size", "1024")
            )
            == 0
        )
        (paths,) = calls["images"]
        files = sorted(str(p) for p in s["img_dir"].iterdir())
        assert paths[:-1] == files and not os.path.exists(paths[-1])  # + one missing stand-in
        (texts,) = calls["texts"]
        assert len(texts) == len(set(texts)) == len({r[4] if r[4].strip() else r[3] for r in ROWS})
        outs[backend] = _read_output(out)
        assert json.loads(met.read_text(encoding="utf-8"))["image_backend"] in ("torch", "onnx")
    assert calls["head"] == 2  # one score_many call per run (6 pairs x 2 images < 1024)
    for k, (label, a, b, _) in outs["torch"].items():
        assert outs["auto"][k][0] == label
        assert outs["auto"][k][1] == pytest.approx(a, abs=1e-5) and outs["auto"][k][2] == pytest.approx(b, abs=1e-5)
