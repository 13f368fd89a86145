"""The image engine choice (issue 13): ``--backend auto`` = ONNX Runtime on a CPU when it
can be imported and agrees with torch on this model, torch otherwise, with a warning when
the agreement check fails; the vectors equal torch's to 1e-5; recall_infer.py records the
engine actually used, reuses a valid cached export and hashes the weights once."""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from fixtures import COLORS, solid_image, tiny_align, write_image  # noqa: E402

import recall_infer  # noqa: E402
from models.checkpoint import save_align_checkpoint  # noqa: E402
from models.engine import onnx as onnx_backend  # noqa: E402
from models.engine import recall_model as factory  # noqa: E402
from models.engine.encode import cpu_cores, default_lanes, encode_images, engine_defaults  # noqa: E402
from models.engine.onnx import OnnxImageEncoder, image_encoder_for, onnxruntime_available  # noqa: E402
from utils.args import Encoding  # noqa: E402


@pytest.fixture(scope="module")
def model(bert_dir):
    return tiny_align(bert_dir, seed=3)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("engine")
    rows = []
    for i, color in enumerate(list(COLORS)[:4]):
        poi = str(300 + i)
        for r, shape in enumerate((None, "圆", "方"), 1):
            write_image(
                solid_image(COLORS[color], (70 + 9 * r, 50), shape, seed=i * 5 + r), d / "images" / f"{poi}_{r}.jpg"
            )
            rows.append([poi, f"{color}色{shape or '山'}", f"http://x.invalid/{poi}_{r}", r, 0, 0, 0])
    with open(d / "recall.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    save_align_checkpoint(model, d / "align.pth")
    return d


def _negated(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.image_hidden_layer.weight.mul_(-1.0)
    return m


def _paths(gallery):
    return sorted((gallery / "images").glob("*.jpg"))


def test_auto_picks_torch_when_onnxruntime_cannot_be_imported(model, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "import onnxruntime" now fails
    assert not onnxruntime_available()
    with caplog.at_level(logging.INFO, logger="models.engine.onnx"):
        f = image_encoder_for(model, "auto", "cpu")
    assert f == model.encode_image
    assert "image engine: torch (onnxruntime is not installed)" in caplog.text
    # forcing onnx is a clear error instead
    with pytest.raises(onnx_backend.OnnxBackendError, match="pip install onnxruntime"):
        image_encoder_for(model, "onnx", "cpu")


def test_auto_picks_torch_off_cpu_or_fp32(model, caplog):
    with caplog.at_level(logging.INFO, logger="models.engine.onnx"):
        assert image_encoder_for(model, "auto", "cpu", precision="bf16") == model.encode_image
        assert image_encoder_for(model, "auto", "cuda") == model.encode_image
    assert "precision bf16" in caplog.text and "the device is cuda" in caplog.text


def test_auto_falls_back_with_a_warning_when_the_check_fails(model, tmp_path, monkeypatch, caplog):
    d = tmp_path / "onnx"
    wrong = OnnxImageEncoder(_negated(model), cache_dir=d)  # a graph of other weights
    # every export of this model now writes that graph: the agreement check must refuse it
    monkeypatch.setattr(onnx_backend, "export_image_graph", lambda m, path, size=224: shutil.copy(wrong.path, path))
    with caplog.at_level(logging.WARNING):
        f = image_encoder_for(model, "auto", "cpu", cache_dir=d)
    assert f == model.encode_image
    assert "differ from torch" in caplog.text and "falling back to the torch image encoder" in caplog.text
    # the same through the model wrapper every script uses
    rm = factory.wrap_align(model, None, backend="auto", onnx_cache_dir=d)
    assert rm.image_backend() == "torch" and rm.engine_info()["image_backend"] == "torch"


def test_auto_vectors_within_1e5_of_torch(model, gallery, tmp_path):
    paths = _paths(gallery) + [tmp_path / "missing.jpg"]
    ref, ok_ref = encode_images(model, paths, Encoding(batch_size=5, num_workers=0, progress=False))
    enc = image_encoder_for(model, "auto", "cpu", cache_dir=tmp_path / "onnx")
    assert isinstance(enc, OnnxImageEncoder)
    got, ok = encode_images(model, paths, Encoding(batch_size=5, num_workers=0, progress=False), engine=lambda: enc)
    assert torch.equal(ok, ok_ref) and ok.tolist() == [True] * 12 + [False]
    assert (got - ref).abs().max().item() <= 1e-5
    assert (ref[0] - ref[1]).abs().max().item() > 1e-3  # image-dependent: the check compares something


def _infer(gallery, bert_dir, out, *extra):
    argv = [
        "--csv",
        str(gallery / "recall.csv"),
        "--image-dir",
        str(gallery / "images"),
        "--checkpoint",
        str(gallery / "align.pth"),
        "--bert-dir",
        str(bert_dir),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--topk",
        "3",
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]
    assert recall_infer.main(argv) == 0
    return json.loads(open(f"{out}.meta.json", encoding="utf-8").read())


def test_recall_infer_records_the_engine_and_reuses_the_export(gallery, bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AVAS_ONNX_CACHE", str(tmp_path / "onnx"))
    exports, hashes = [], []
    real_export, real_hash = onnx_backend.export_image_graph, factory.model_hash
    monkeypatch.setattr(onnx_backend, "export_image_graph", lambda *a, **kw: exports.append(a) or real_export(*a, **kw))
    monkeypatch.setattr(factory, "model_hash", lambda m: hashes.append(1) or real_hash(m))
    monkeypatch.setattr(onnx_backend, "model_hash", lambda m: pytest.fail("weights hashed twice"))

    meta = _infer(gallery, bert_dir, tmp_path / "a.csv")
    assert meta["backend"] == "auto" and meta["image_backend"] == "onnx"  # the default
    assert meta["onnx_exported"] is True and meta["onnx_max_abs_diff"] <= 1e-5
    assert len(exports) == 1 and len(hashes) == 1
    assert meta["timings_s"]["first_image"] > 0 and meta["num_workers"] == 0
    # a second run finds the valid export: nothing exported
    meta2 = _infer(gallery, bert_dir, tmp_path / "b.csv", "--backend", "auto")
    assert meta2["image_backend"] == "onnx" and meta2["onnx_exported"] is False and len(exports) == 1
    # with an embedding cache, one hash of the weights serves the cache and the export
    hashes.clear()
    cache = ["--cache-dir", str(tmp_path / "cache")]
    meta3 = _infer(gallery, bert_dir, tmp_path / "c.csv", *cache)
    assert meta3["image_backend"] == "onnx" and len(hashes) == 1 and len(exports) == 2
    assert list((tmp_path / "cache" / "onnx").glob("image_*.onnx"))
    # everything cached: no engine is set up at all
    meta4 = _infer(gallery, bert_dir, tmp_path / "d.csv", *cache)
    assert meta4["images_encoded"] == 0 and meta4["image_backend"] is None and len(exports) == 2
    # torch, forced: the same ranking, scores within 1e-5
    meta5 = _infer(gallery, bert_dir, tmp_path / "e.csv", "--backend", "torch")
    assert meta5["backend"] == meta5["image_backend"] == "torch" and "onnx_exported" not in meta5

    def rows(p):
        with open(p, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    b, e = rows(tmp_path / "b.csv"), rows(tmp_path / "e.csv")
    assert [(r["poi_id"], r["image"]) for r in b] == [(r["poi_id"], r["image"]) for r in e]
    assert max(abs(float(x["score"]) - float(y["score"])) for x, y in zip(b, e)) <= 1e-5
    assert rows(tmp_path / "d.csv") == rows(tmp_path / "c.csv")


def test_recall_infer_rejects_an_unknown_backend(gallery, bert_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _infer(gallery, bert_dir, tmp_path / "x.csv", "--backend", "tensorrt")
    assert e.value.code == 2 and "--backend" in capsys.readouterr().err


def test_core_split_defaults():
    n = cpu_cores()
    before = torch.get_num_threads()
    assert default_lanes() == min(n, before)
    torch.set_num_threads(1)
    try:
        assert default_lanes() == 1  # a Ray actor's budget, OMP_NUM_THREADS
    finally:
        torch.set_num_threads(before)
    assert engine_defaults("cpu", "torch")[1] == max(1, min(n // 2, 8))  # beside torch's threads
    assert engine_defaults("cpu", "onnx")[1] == max(1, min(n - 1, 8))  # one ONNX Runtime lane: all but one core decode
    assert engine_defaults("cuda")[1] == max(1, min(n, 8))


def test_recall_infer_decoding_workers_change_nothing(gallery, bert_dir, tmp_path):
    """Decoding in a worker process vs in the main process: the same files, bit for bit, on torch."""
    outs = {}
    for name, workers in (("w1", "1"), ("w0", "0")):
        out = tmp_path / f"{name}.csv"
        argv = [
            "--csv",
            str(gallery / "recall.csv"),
            "--image-dir",
            str(gallery / "images"),
            "--checkpoint",
            str(gallery / "align.pth"),
            "--bert-dir",
            str(bert_dir),
            "--output",
            str(out),
            "--full-output",
            str(tmp_path / f"{name}.full.csv"),
            "--device",
            "cpu",
            "--num-workers",
            workers,
            "--backend",
            "torch",
            "--no-progress",
        ]
        assert recall_infer.main(argv) == 0
        outs[name] = (out.read_bytes(), (tmp_path / f"{name}.full.csv").read_bytes())
    assert outs["w1"] == outs["w0"]


# ---------------------------------------------------------------------------
# lanes: ONNX Runtime on a CPU, one thread per core decoding a batch and encoding it
# ---------------------------------------------------------------------------
@pytest.fixture()
def lanes_encoder(model, tmp_path):
    return OnnxImageEncoder(model, cache_dir=tmp_path / "onnx", lanes=2)


def _classic(enc, model, paths, batch_size, loader=None):
    """The same session run from one thread (DataLoader path): what the lanes must give."""
    lanes, enc.lanes = enc.lanes, 1
    try:
        e = Encoding(batch_size=batch_size, progress=False, num_workers=0)
        return encode_images(model, paths, e, engine=lambda: enc, loader=loader)
    finally:
        enc.lanes = lanes


def test_lanes_give_the_vectors_of_one_caller(model, gallery, tmp_path, lanes_encoder):
    paths = _paths(gallery) + [tmp_path / "missing.jpg"] + _paths(gallery)[:3]
    ref, ok_ref = _classic(lanes_encoder, model, paths, batch_size=3)
    stats = {}
    got, ok = encode_images(
        model, paths, Encoding(batch_size=3, progress=False), engine=lambda: lanes_encoder, stats=stats
    )
    assert stats["lanes"] == 2 and stats["num_workers"] == 0
    assert torch.equal(got, ref) and torch.equal(ok, ok_ref) and ok.tolist().count(False) == 1
    torch_ref, _ = encode_images(model, paths, Encoding(batch_size=3, progress=False, num_workers=0))
    assert (got - torch_ref).abs().max().item() <= 1e-5


def test_lanes_with_another_models_preprocessing(model, gallery, lanes_encoder):
    from utils.formats.images import load_clip_image

    paths = _paths(gallery)
    ref, _ = _classic(lanes_encoder, model, paths, batch_size=5, loader=load_clip_image)
    got, _ = encode_images(
        model, paths, Encoding(batch_size=5, progress=False), engine=lambda: lanes_encoder, loader=load_clip_image
    )
    assert torch.equal(got, ref)


def test_a_failing_lane_stops_the_run_and_leaves_no_thread(model, gallery, lanes_encoder):
    import threading

    calls = []

    def flaky(x, normalize=False):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("engine broke")
        return lanes_encoder(x, normalize)

    flaky.lanes = 2
    with pytest.raises(RuntimeError, match="engine broke"):
        encode_images(model, _paths(gallery), Encoding(batch_size=2, progress=False), engine=lambda: flaky)
    assert not [t for t in threading.enumerate() if t.name.startswith("lane-")]


def test_encoding_leaves_the_model_as_it_was_found(model, gallery):
    """Train mode and the plain memory format survive an encoding run in channels_last."""
    conv = next(p for p in model.image_model.parameters() if p.dim() == 4)
    model.train()
    try:
        encode_images(model, _paths(gallery)[:2], Encoding(batch_size=2, num_workers=0, progress=False))
        assert model.training and conv.is_contiguous()
    finally:
        model.eval()
