"""recall_train.py and rank_train.py on learnable tasks the tests generate, plus exact
resume. Small model variant (TRAIN_ARCH below: TINY_ARCH made thinner, with faster
BatchNorm running statistics so that a few dozen steps give a usable eval mode, and
no dropout / drop-connect, which made so short a training unstable)."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from math import comb

import numpy as np
import pytest
import torch
from fixtures import COLORS, TINY_ARCH, make_bert_dir, solid_image, tiny_align, write_image
from PIL import Image

import rank_train
import recall_train
from models.align import AlignArch, load_tokenizer
from models.checkpoint import load_align_model, load_ranker, save_align_checkpoint
from models.engine.encode import encode_images, encode_texts
from utils.args import Encoding
from utils.evaluation.metrics import pairwise_metrics
from utils.formats import iter_rank_csv, load_poi_tables
from utils.formats.poi import save_tables
from utils.formats.rows import RECORD_SEP
from utils.hashing import model_hash
from utils.training import (
    DistEnv,
    MetricsWriter,
    augment_pil,
    load_train_state,
    read_metrics,
    read_text_pairs,
    split_owners,
    warmup_schedule,
)

TRAIN_ARCH = AlignArch(
    image_model=TINY_ARCH.image_model,
    image_overrides={
        "width_coefficient": 0.125,
        "depth_coefficient": 0.1,
        "depth_divisor": 4,
        "batch_norm_momentum": 0.8,
        "dropout_rate": 0.0,
        "drop_connect_rate": 0.0,
    },
    text_layers=1,
    embed_dim=32,
)
SHAPES = ("圆", "方")
COMMON = ["--workers", "0", "--device", "cpu"]


# ---------------------------------------------------------------------------
# generated data
# ---------------------------------------------------------------------------
def make_recall_data(root, owners_per_combo=2, images_per_owner=3, seed=0):
    """Recall-format CSV: POI '<colour>色<shape>形' owns images of that colour with that
    shape. Each (colour, shape) has several POIs, so held-out texts were seen."""
    lines, n = [], seed * 10_000
    for ci, colour in enumerate(COLORS):
        for si, shape in enumerate(SHAPES):
            for o in range(owners_per_combo):
                pid = f"p{ci}{si}{o}"
                for r in range(images_per_owner):
                    n += 1
                    write_image(solid_image(COLORS[colour], (32, 32), shape, seed=n), root / "img" / f"{pid}_{r}.png")
                    lines.append(f"{pid},{colour}色{shape}形,http://127.0.0.1/{pid}_{r},{r},32,32,")
    (root / "recall.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "arch.json").write_text(json.dumps(asdict(TRAIN_ARCH)), encoding="utf-8")
    return root / "recall.csv", root / "img", root / "arch.json"


RANK_COLORS = ("黑", "蓝", "黄", "白")  # brightness (sum of RGB) 30, 310, 470, 735
POIS = ["山", "海", "湖", "塔", "桥", "寺"]


def make_rank_data(root, n_train, n_val, seed=0, dim=32):
    """$record$ pairs whose label is decided by brightness: the brighter image has the
    higher CTR. POI tables in both formats (pickled .npy and safe .npz)."""
    rng = np.random.default_rng(seed)
    names = list(RANK_COLORS)
    bright = {c: sum(COLORS[c]) for c in names}
    img = root / "rank_img"

    def rows(n, tag):
        out = []
        for i in range(n):
            ca, cb = rng.choice(names, 2, replace=False)
            item = f"{tag}{i}"
            write_image(solid_image(COLORS[ca], (24, 24), seed=int(rng.integers(1e9))), img / f"{item}_a.png")
            write_image(solid_image(COLORS[cb], (24, 24), seed=int(rng.integers(1e9))), img / f"{item}_b.png")
            ctr_a, ctr_b = (2, 1) if bright[ca] > bright[cb] else (1, 2)
            pois = ",".join(rng.choice(POIS, int(rng.integers(0, 4)), replace=False))
            out.append(
                RECORD_SEP.join(
                    [
                        item,
                        f"http://127.0.0.1/{item}_a",
                        f"http://127.0.0.1/{item}_b",
                        str(ctr_a),
                        str(ctr_b),
                        f"{ca}色大{cb}色小",
                        "cate",
                        "",
                        "",
                        pois,
                    ]
                )
            )
        return out

    (root / "train.csv").write_text("\n".join(rows(n_train, "t")) + "\n", encoding="utf-8")
    (root / "val.csv").write_text("\n".join(rows(n_val, "v")) + "\n", encoding="utf-8")
    trng = np.random.default_rng(1)
    save_tables({root / "pic_num.npy": {p: [int(x) for x in trng.integers(0, 9, 3)] for p in POIS}})
    save_tables({root / "img_vec.npz": {p: trng.normal(size=dim) for p in POIS}})
    save_tables({root / "name_vec.npz": {p: trng.normal(size=dim) for p in POIS[:-1]}})
    return [
        "--train-csv",
        str(root / "train.csv"),
        "--val-csv",
        str(root / "val.csv"),
        "--image-dir",
        str(img),
        "--poi-pic-num",
        str(root / "pic_num.npy"),
        "--poi-image-vectors",
        str(root / "img_vec.npz"),
        "--poi-name-vectors",
        str(root / "name_vec.npz"),
    ]


def chance_recall(gallery: int, per_owner: int, k: int) -> float:
    return 1 - comb(gallery - per_owner, k) / comb(gallery, k)


def train_losses(out_dir) -> list[float]:
    return [float(r["loss"]) for r in read_metrics(out_dir / "metrics.csv") if r["split"] == "train"]


# ---------------------------------------------------------------------------
# recall: learns, saves the authors' format
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    bert = make_bert_dir(root / "bert")
    csv, img, arch = make_recall_data(root)
    out = root / "run"
    rc = recall_train.main(
        [
            "--csv",
            str(csv),
            "--image-dir",
            str(img),
            "--bert-dir",
            str(bert),
            "--arch",
            str(arch),
            "--out-dir",
            str(out),
            "--epochs",
            "20",
            "--batch-size",
            "16",
            "--lr",
            "5e-3",
            "--warmup-steps",
            "3",
            "--logit-scale",
            "10",
            "--val-fraction",
            "0.5",
            "--seed",
            "0",
            "--eval-every",
            "4",
            *COMMON,
        ]
    )
    assert rc == 0
    return {"root": root, "bert": bert, "out": out, "csv": csv, "img": img, "arch": arch}


def test_recall_learns_held_out(recall_run):
    rows = read_metrics(recall_run["out"] / "metrics.csv")
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 5 and int(val[0]["queries"]) == 16 and int(val[0]["gallery"]) == 48
    chance = chance_recall(48, 3, 5)  # 0.286
    first, best = float(val[0]["recall@5"]), max(float(r["recall@5"]) for r in val)
    assert best >= 0.6 > 2 * chance, (first, best, chance)
    losses = train_losses(recall_run["out"])
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.4  # ln 16 = 2.77 at the start

    # best.pth is the authors' format and reproduces the logged held-out figure
    raw = torch.load(recall_run["out"] / "best.pth", weights_only=True)
    assert set(raw) == {"state_dict", "arch"} and "logit_scale" in raw["state_dict"]
    model = load_align_model(recall_run["out"] / "best.pth", recall_run["bert"])
    assert model.arch == TRAIN_ARCH
    pairs, _ = read_text_pairs(str(recall_run["csv"]), str(recall_run["img"]))
    _, held = split_owners(pairs, 0.5, None, 0)
    queries = list(dict.fromkeys((p.owner, p.text) for p in held))
    img, _ = encode_images(model, [p.image for p in held], Encoding(num_workers=0, progress=False))
    txt = encode_texts(model, load_tokenizer(recall_run["bert"]), [t for _, t in queries])
    top5 = torch.topk(txt @ img.T, 5, dim=1).indices
    hits = [any(held[j].owner == o for j in row.tolist()) for (o, _), row in zip(queries, top5)]
    assert np.mean(hits) == pytest.approx(best)


def test_recall_resume_matches_uninterrupted(tmp_path, bert_dir, capsys):
    """6 steps straight vs 3 (stopping mid-epoch 2) + --resume 3: same per-step losses
    and same final weights. Image tower trains with BatchNorm in training mode; gradient
    accumulation (2 micro-batches) and an epoch-end evaluation happen on the way."""
    csv, img, arch = make_recall_data(tmp_path, owners_per_combo=1, images_per_owner=2)
    args = [
        "--csv",
        str(csv),
        "--image-dir",
        str(img),
        "--bert-dir",
        str(bert_dir),
        "--arch",
        str(arch),
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--accum-steps",
        "2",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--logit-scale",
        "5",
        "--val-owners",
        "8",
        *COMMON,
    ]
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert recall_train.main(args + ["--out-dir", str(a)]) == 0
    assert recall_train.main(args + ["--out-dir", str(b), "--stop-after-step", "3"]) == 0
    state = load_train_state(b / "train_state.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 1, 1)
    assert len(train_losses(b)) == 3
    assert recall_train.main(args + ["--out-dir", str(b), "--resume"]) == 0
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == len(lb) == 6
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-6)
    assert [r["split"] for r in read_metrics(a / "metrics.csv")] == [
        r["split"] for r in read_metrics(b / "metrics.csv")
    ]
    wa = load_align_model(a / "last.pth", bert_dir).state_dict()
    wb = load_align_model(b / "last.pth", bert_dir).state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
    # a different schedule is refused (one line, exit 2)
    capsys.readouterr()
    assert recall_train.main([x if x != "3e-3" else "1e-3" for x in args] + ["--out-dir", str(b), "--resume"]) == 2
    assert "settings differ" in capsys.readouterr().err


def test_recall_plain_csv_and_frozen_cached_image_tower(tmp_path, bert_dir, capsys):
    """text,image CSV with a header; --freeze image --cache-embeddings leaves the image
    tower bit-identical and trains the text side."""
    d = tmp_path / "imgs"
    lines = ["text,image"]
    for i, colour in enumerate(COLORS):
        for r in range(2):
            write_image(solid_image(COLORS[colour], seed=10 * i + r), d / f"{i}_{r}.jpg")
            lines.append(f"{colour}色,imgs/{i}_{r}.jpg")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    init = tmp_path / "init.pth"
    start = tiny_align(bert_dir, seed=3)
    save_align_checkpoint(start, init)
    out = tmp_path / "run"
    assert (
        recall_train.main(
            [
                "--csv",
                str(tmp_path / "pairs.csv"),
                "--bert-dir",
                str(bert_dir),
                "--init",
                str(init),
                "--out-dir",
                str(out),
                "--freeze",
                "image",
                "--cache-embeddings",
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--val-owners",
                "2",
                *COMMON,
            ]
        )
        == 0
    )
    end = load_align_model(out / "last.pth", bert_dir)
    s0, s1 = start.state_dict(), end.state_dict()
    for k in s0:
        if k.startswith(("image_model.", "image_hidden_layer.", "text_model.pooler.")):
            assert torch.equal(s0[k], s1[k]), k
    assert not torch.equal(s0["text_hidden_layer.weight"], s1["text_hidden_layer.weight"])
    with pytest.raises(SystemExit) as e:  # argparse: exit 2
        recall_train.main(
            [
                "--csv",
                str(tmp_path / "pairs.csv"),
                "--bert-dir",
                str(bert_dir),
                "--out-dir",
                str(out),
                "--cache-embeddings",
                *COMMON,
            ]
        )
    assert e.value.code == 2 and "needs --freeze image" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# ranking: learns from the recall model trained above, exact resume with augmentation
# ---------------------------------------------------------------------------
def test_rank_learns_brightness(recall_run, tmp_path):
    data = make_rank_data(tmp_path, n_train=64, n_val=48)
    out = tmp_path / "run"
    rc = rank_train.main(
        data
        + [
            "--bert-dir",
            str(recall_run["bert"]),
            "--init",
            str(recall_run["out"] / "best.pth"),
            "--out-dir",
            str(out),
            "--no-augment",
            "--cache-embeddings",
            "--epochs",
            "6",
            "--seed",
            "0",
            *COMMON,
        ]
    )
    assert rc == 0
    val = [r for r in read_metrics(out / "metrics.csv") if r["split"] == "val"]
    assert len(val) == 6
    best = max(float(r["accuracy"]) for r in val)
    baseline = float(val[0]["baseline"])  # constant guess, ~0.56
    assert best >= 0.85 and best > baseline + 0.25, (best, baseline)
    assert max(float(r["auc"]) for r in val) >= 0.9
    assert float(val[-1]["log_loss"]) < float(val[0]["log_loss"])

    # best.ckpt: the published ranker format; recomputing its val accuracy from scratch
    raw = torch.load(out / "best.ckpt", weights_only=True)
    assert "linear1.weight" in raw and "align_model.logit_scale" in raw
    ranker = load_ranker(out / "best.ckpt", recall_run["bert"])
    init = load_align_model(recall_run["out"] / "best.pth", recall_run["bert"])
    assert model_hash(ranker.align_model) == model_hash(init)  # the recall model stayed frozen
    rows = list(iter_rank_csv(tmp_path / "val.csv"))
    img = tmp_path / "rank_img"
    ea, _ = encode_images(
        ranker.align_model, [img / f"{r.item_id}_a.png" for r in rows], Encoding(num_workers=0, progress=False)
    )
    eb, _ = encode_images(
        ranker.align_model, [img / f"{r.item_id}_b.png" for r in rows], Encoding(num_workers=0, progress=False)
    )
    ns = rank_train.build_parser().parse_args(data + ["--bert-dir", "x", "--out-dir", "x"])
    tables = load_poi_tables(ns.poi_pic_num, ns.poi_image_vectors, ns.poi_name_vectors, dim=32)
    items = [tables.inputs(r.title, r.poi_names) for r in rows]
    feat = encode_texts(ranker.align_model, load_tokenizer(recall_run["bert"]), [it.pois_text for it in items])
    pi = torch.from_numpy(np.stack([it.poi_img for it in items]))
    pt = torch.from_numpy(np.stack([it.poi_txt for it in items]))
    pl = torch.tensor([it.poi_len for it in items])
    with torch.no_grad():
        sa = ranker.score_embeddings(ea, feat, pi, pt, pl).squeeze(1)
        sb = ranker.score_embeddings(eb, feat, pi, pt, pl).squeeze(1)
    m = pairwise_metrics([r.label for r in rows], sa.numpy(), sb.numpy())
    assert m["accuracy"] == pytest.approx(best)


def test_rank_resume_with_augmentation_and_margin_loss(recall_run, tmp_path):
    """Augmentation on, dropout on, margin loss: 6 steps straight vs 3 + --resume 3."""
    data = make_rank_data(tmp_path, n_train=8, n_val=4, seed=5)
    args = data + [
        "--bert-dir",
        str(recall_run["bert"]),
        "--init",
        str(recall_run["out"] / "best.pth"),
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--loss",
        "margin",
        *COMMON,
    ]
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert rank_train.main(args + ["--out-dir", str(a)]) == 0
    assert rank_train.main(args + ["--out-dir", str(b), "--stop-after-step", "3"]) == 0
    assert rank_train.main(args + ["--out-dir", str(b), "--resume"]) == 0
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == 6 and len(set(la)) > 1
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-6)
    assert model_hash(load_ranker(a / "last.ckpt", recall_run["bert"])) == model_hash(
        load_ranker(b / "last.ckpt", recall_run["bert"])
    )


def test_rank_refuses_augment_with_cache(tmp_path, bert_dir, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: exit 2
        rank_train.main(
            [
                "--train-csv",
                "t",
                "--val-csv",
                "v",
                "--image-dir",
                str(tmp_path),
                "--bert-dir",
                str(bert_dir),
                "--out-dir",
                str(tmp_path),
                "--cache-embeddings",
            ]
        )
    assert e.value.code == 2 and "needs --no-augment" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def test_augment_pil_rotation_and_flip():
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    img.putpixel((0, 15), (0, 255, 0))
    flips, corners = 0, 0
    for i in range(300):
        rng = np.random.default_rng(i)
        angle, flip = rng.uniform(-5, 5), rng.random() < 0.3
        out = augment_pil(img, np.random.default_rng(i))
        assert out.size == img.size and out.mode == "RGB"
        expected = img.rotate(angle, resample=Image.NEAREST, fillcolor=(0, 0, 0))
        if flip:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        assert np.array_equal(np.asarray(out), np.asarray(expected))
        flips += flip
        if abs(angle) > 2:  # black fill where the rotation uncovers a corner
            corners += 1
            assert np.asarray(out)[0, 0].sum() == 0 or np.asarray(out)[-1, -1].sum() == 0
    assert 0.2 < flips / 300 < 0.4
    assert corners > 150


def test_warmup_cosine_schedule():
    s = functools.partial(warmup_schedule, warmup=4, total=14)
    assert [round(s(i), 3) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert s(4) == 1.0 and s(9) == pytest.approx(0.5) and s(14) == pytest.approx(0.0, abs=1e-12)
    assert warmup_schedule(7, 0, 10, "constant") == 1.0


def test_metrics_writer_truncates_on_resume(tmp_path):
    env = DistEnv()
    w = MetricsWriter(tmp_path / "m.csv", ["step", "loss"], env)
    for i in range(5):
        w.write(step=i, loss=0.5 + i)
    w2 = MetricsWriter(tmp_path / "m.csv", ["step", "loss"], env, keep_rows=3)
    assert w2.rows == 3
    w2.write(step=3, loss=9.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "m.csv")] == [
        ("0", "0.5"),
        ("1", "1.5"),
        ("2", "2.5"),
        ("3", "9.0"),
    ]


def test_rank_defaults_and_losses_are_the_authors():
    """SPEC 5: Adam at 1e-3, batch 16, BCE on sigmoid(s_a - s_b) or
    MarginRankingLoss(margin 0.5) on (s_a, s_b, +1/-1); augmentation on."""
    a = rank_train.build_parser().parse_args(
        ["--train-csv", "t", "--val-csv", "v", "--image-dir", "i", "--bert-dir", "b", "--out-dir", "o"]
    )
    assert (a.optimizer, a.lr, a.batch_size, a.weight_decay) == ("adam", 1e-3, 16, 0.0)
    assert (a.schedule, a.warmup_steps, a.clip_grad) == ("constant", 0, 0.0)
    assert (a.loss, a.margin, a.augment) == ("bce", 0.5, True)
    g = torch.Generator().manual_seed(0)
    s_a, s_b = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    label = (torch.rand(16, generator=g) < 0.5).float()
    bce = torch.nn.BCELoss()(torch.sigmoid(s_a - s_b), label)
    assert torch.allclose(rank_train.pair_loss(s_a, s_b, label, "bce", 0.5), bce, atol=1e-6)
    margin = torch.nn.MarginRankingLoss(margin=0.5)(s_a, s_b, torch.where(label > 0, 1.0, -1.0))
    assert torch.allclose(rank_train.pair_loss(s_a, s_b, label, "margin", 0.5), margin, atol=1e-6)


def test_image_engine_of_training_evaluation(tmp_path, bert_dir, caplog, monkeypatch):
    """--backend (issue 13): a frozen tower goes to ONNX Runtime under auto (exported once,
    into the ONNX cache); an image tower that trains stays on torch under auto (no export),
    and --backend onnx exports it per evaluation into a temporary directory, never the
    cache."""
    import logging
    import os

    from models.engine import onnx as onnx_backend

    if not onnx_backend.onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    cache = os.environ["AVAS_ONNX_CACHE"]
    exports = []  # a spy on the one export function: how many exports this test caused
    real_export = onnx_backend.export_image_graph

    def spy(*a, **kw):
        exports.append(a[1] if len(a) > 1 else kw.get("path"))
        return real_export(*a, **kw)

    monkeypatch.setattr(onnx_backend, "export_image_graph", spy)
    csv, img, arch = make_recall_data(tmp_path, owners_per_combo=1, images_per_owner=2)
    args = [
        "--csv",
        str(csv),
        "--image-dir",
        str(img),
        "--bert-dir",
        str(bert_dir),
        "--arch",
        str(arch),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--val-owners",
        "4",
        "--logit-scale",
        "5",
        *COMMON,
    ]
    n0, files0 = len(exports), sorted(os.listdir(cache))
    assert recall_train.main(args + ["--out-dir", str(tmp_path / "auto")]) == 0
    assert len(exports) == n0 and sorted(os.listdir(cache)) == files0
    assert recall_train.main(args + ["--out-dir", str(tmp_path / "onnx"), "--backend", "onnx"]) == 0
    assert len(exports) == n0 + 1 and sorted(os.listdir(cache)) == files0  # 1 evaluation
    v_auto = [r for r in read_metrics(tmp_path / "auto" / "metrics.csv") if r["split"] == "val"]
    v_onnx = [r for r in read_metrics(tmp_path / "onnx" / "metrics.csv") if r["split"] == "val"]
    assert [r["recall@5"] for r in v_auto] == [r["recall@5"] for r in v_onnx]

    data = make_rank_data(tmp_path, n_train=8, n_val=4)
    init = tmp_path / "init.pth"
    save_align_checkpoint(tiny_align(bert_dir, seed=1), init)
    with caplog.at_level(logging.INFO):
        assert (
            rank_train.main(
                data
                + [
                    "--bert-dir",
                    str(bert_dir),
                    "--init",
                    str(init),
                    "--out-dir",
                    str(tmp_path / "rank"),
                    "--epochs",
                    "1",
                    "--batch-size",
                    "4",
                    "--no-augment",
                    "--cache-embeddings",
                    *COMMON,
                ]
            )
            == 0
        )
    assert "image engine: onnx" in caplog.text


# ---------------------------------------------------------------------------
# the shared loop as a library: a TrainConfig and a Task, no command line
# ---------------------------------------------------------------------------
class _Regression(torch.utils.data.Dataset):
    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _toy_run(out, **kw) -> dict:
    """A regression net with dropout (so the RNG state matters) through utils.training.train."""
    from utils.training import Task, TrainConfig, train

    options = {"lr": 0.05, "note": "anything the run should record"}
    cfg = TrainConfig(
        out_dir=out,
        epochs=3,
        batch_size=4,
        lr=0.05,
        optimizer="adam",
        seed=1,
        progress=False,
        num_workers=0,
        options=options,
        resume_keys=("lr",),
        **kw,
    )
    data = _Regression()

    def load(path):
        torch.manual_seed(7)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
        if path is not None:
            model.load_state_dict(torch.load(path, weights_only=True))
        return model

    def make(model):
        def validate():
            with torch.no_grad():
                return {"neg_mse": -float(torch.nn.functional.mse_loss(model.eval()(data.x).squeeze(1), data.y))}

        return Task(
            module=model,
            dataset=data,
            loss=lambda module, batch: torch.nn.functional.mse_loss(module(batch[0]).squeeze(1), batch[1]),
            save=lambda m, path: torch.save(m.state_dict(), path),
            validate=validate,
            select="neg_mse",
            val_fields=("neg_mse",),
        )

    return train(cfg, DistEnv(), load, make)


def test_library_loop_resumes_bit_for_bit(tmp_path):
    """utils.training.train takes explicit settings (no argparse namespace) and returns a
    summary; stopped mid-epoch and resumed, it ends where an uninterrupted run ends."""
    a, b = tmp_path / "straight", tmp_path / "resumed"
    sa = _toy_run(a)
    assert (sa["steps"], sa["stopped"], sa["processes"]) == (18, False, 1) and sa["best"] > -1e9
    assert json.loads((a / "config.json").read_text(encoding="utf-8"))["note"] == "anything the run should record"
    assert _toy_run(b, stop_after_step=8)["stopped"]
    sb = _toy_run(b, resume=True)
    assert sb["steps"] == 18 and sb["best"] == sa["best"]
    timeless = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(d / "metrics.csv")] for d in (a, b)
    ]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 18 + 3
    wa, wb = torch.load(a / "last.pth", weights_only=True), torch.load(b / "last.pth", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------
# the engine hands the model back in its memory format; training goes on after it
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_training_after_an_engine_call_keeps_the_memory_format(tmp_path, bert_dir, fmt):
    from models import contrastive_loss, tokenize, wrap_align
    from utils.args import Encoding
    from utils.training import PairEncoder, held_out_recall, read_text_pairs

    lines = ["text,image"] + [f"{c}色,{i}.png" for i, c in enumerate(COLORS)]
    for i, c in enumerate(COLORS):
        write_image(solid_image(COLORS[c], (32, 32), seed=i), tmp_path / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs, _ = read_text_pairs(tmp_path / "pairs.csv")
    align = tiny_align(bert_dir, seed=4)
    align.image_model.to(memory_format=fmt)
    strides = {k: p.stride() for k, p in align.named_parameters()}
    tokenizer = load_tokenizer(bert_dir)
    rm = wrap_align(align, tokenizer, backend="torch")
    res = held_out_recall(rm, pairs, [1], Encoding(batch_size=2, num_workers=0, progress=False))
    assert res["gallery"] == len(pairs)
    assert {k: p.stride() for k, p in align.named_parameters()} == strides  # as it was handed over

    optimizer = torch.optim.SGD([p for p in align.parameters() if p.requires_grad], lr=0.1)
    before = align.image_hidden_layer.weight.detach().clone()
    images = torch.stack([load_image_tensor(p.image) for p in pairs])
    tok = tokenize(tokenizer, [p.text for p in pairs])
    img, txt = PairEncoder(align).train()(images, tok["input_ids"], tok["attention_mask"])
    contrastive_loss(align.similarity(img, txt)).backward()
    optimizer.step()
    assert not torch.equal(before, align.image_hidden_layer.weight)
    assert {k: p.stride() for k, p in align.named_parameters()} == strides


def load_image_tensor(path):
    from utils.formats import load_image

    return load_image(path)[0]


# ---------------------------------------------------------------------------
# every flag and old spelling of the command lines still parses
# ---------------------------------------------------------------------------
def test_old_spellings_and_shared_flags_parse(tmp_path):
    r = recall_train.build_parser().parse_args(
        ["--csv", "c", "--bert-dir", "b", "--out-dir", "o", "--workers", "3", "--skip-bad-rows", "--no-amp"]
    )
    assert (r.num_workers, r.skip_bad_rows, r.no_amp, r.batch_size, r.lr, r.weight_decay) == (
        3,
        True,
        True,
        32,
        5e-5,
        0.01,
    )
    assert (r.warmup_steps, r.schedule, r.clip_grad, r.eval_batch_size, r.backend, r.preprocess) == (
        100,
        "cosine",
        1.0,
        32,
        "auto",
        "reference",
    )
    k = rank_train.build_parser().parse_args(
        [
            "--train-csv",
            "t",
            "--val-csv",
            "v",
            "--image-dir",
            "i",
            "--bert-dir",
            "b",
            "--out-dir",
            "o",
            "--pic-num",
            "p",
            "--img-vectors",
            "iv",
            "--name-vectors",
            "nv",
            "--workers",
            "0",
            "--log-level",
            "debug",
        ]
    )
    assert (k.poi_pic_num, k.poi_image_vectors, k.poi_name_vectors, k.num_workers) == ("p", "iv", "nv", 0)
    assert (k.log_level, k.epochs, k.eval_batch_size) == ("DEBUG", 10, 32)
