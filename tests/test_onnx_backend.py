"""ONNX Runtime image backend (utils/onnx_backend.py): same vectors as torch for any
batch size, the export cached per weights, and recall_infer.py --backend onnx giving the
same top-k as torch on a generated gallery. Skipped when onnxruntime is not installed."""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from fixtures import COLORS, solid_image, tiny_align, write_image  # noqa: E402

import recall_infer  # noqa: E402
from models.checkpoint import save_align_checkpoint  # noqa: E402
from models.engine import onnx as onnx_backend  # noqa: E402
from models.engine.encode import encode_images  # noqa: E402
from models.engine.onnx import OnnxBackendError, OnnxImageEncoder, image_encoder_for  # noqa: E402
from utils.args import Encoding
from utils.hashing import model_hash


@pytest.fixture(scope="module")
def model(bert_dir):
    return tiny_align(bert_dir, seed=0)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def encoder(model, onnx_dir):
    return OnnxImageEncoder(model, cache_dir=onnx_dir)


def test_vectors_equal_torch_for_batch_sizes_1_and_5(model, encoder):
    assert encoder.max_abs_diff <= 1e-5
    g = torch.Generator().manual_seed(1)
    for b in (1, 5):
        x = torch.randn(b, 3, 224, 224, generator=g)
        with torch.inference_mode():
            ref = model.encode_image(x)
            ref_raw = model.encode_image(x, normalize=False)
        got, raw = encoder.encode_image(x), encoder(x, normalize=False)
        assert got.shape == ref.shape == (b, 32) and got.dtype == torch.float32
        assert (got - ref).abs().max().item() <= 1e-5
        assert (raw - ref_raw).abs().max().item() <= 1e-5 * max(1.0, ref_raw.abs().max().item())
        # the vectors are image-dependent, so this compares something
        if b > 1:
            assert (ref[0] - ref[1]).abs().max().item() > 1e-3
    # channels_last input (what encode_images feeds torch) is accepted as well
    x = torch.randn(2, 3, 224, 224, generator=g)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(encoder(x), encoder(xc))


def _count_exports(monkeypatch) -> list:
    """Record every export of this test (a spy on onnx_backend.export_image_graph)."""
    calls = []
    real = onnx_backend.export_image_graph

    def spy(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(onnx_backend, "export_image_graph", spy)
    return calls


def test_export_is_cached_per_weights(model, encoder, onnx_dir, bert_dir, monkeypatch):
    assert encoder.path.parent == onnx_dir and encoder.path.is_file()
    exports = _count_exports(monkeypatch)
    mtime, count = encoder.path.stat().st_mtime_ns, len(exports)
    again = OnnxImageEncoder(model, cache_dir=onnx_dir, weights_hash=model_hash(model))
    assert not again.exported and again.path == encoder.path
    assert len(exports) == count and encoder.path.stat().st_mtime_ns == mtime
    other = tiny_align(bert_dir, seed=1)
    enc2 = OnnxImageEncoder(other, cache_dir=onnx_dir)
    assert enc2.exported and enc2.path != encoder.path and len(exports) == count + 1
    assert sorted(p.name for p in onnx_dir.glob("*.onnx")) == sorted([encoder.path.name, enc2.path.name])
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        assert (enc2(x) - other.encode_image(x)).abs().max().item() <= 1e-5
        assert (encoder(x) - enc2(x)).abs().max().item() > 1e-3  # really another model


def _negated(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.image_hidden_layer.weight.mul_(-1.0)
    return m


def test_wrong_export_is_redone_or_refused_and_torch_used(model, caplog, tmp_path, monkeypatch):
    caplog.set_level(logging.INFO)  # whatever level an earlier test left the root logger at
    d = tmp_path / "wrong"
    mine = OnnxImageEncoder(model, cache_dir=d)
    theirs = OnnxImageEncoder(_negated(model), cache_dir=d)
    # a cached file that computes other vectors: exported again, then right
    shutil.copy(theirs.path, mine.path)
    exports = _count_exports(monkeypatch)
    count = len(exports)
    redone = OnnxImageEncoder(model, cache_dir=d)
    assert redone.exported and len(exports) == count + 1
    assert redone.max_abs_diff <= 1e-5 and "differ from torch" in caplog.text
    # an export that does not match torch is refused ...
    monkeypatch.setattr(onnx_backend, "export_image_graph", lambda m, path, size: shutil.copy(theirs.path, path))
    mine.path.unlink()
    with pytest.raises(OnnxBackendError, match="differ from torch"):
        OnnxImageEncoder(model, cache_dir=d)
    # ... and encode_images' helper falls back to torch with a warning
    caplog.clear()
    f = image_encoder_for(model, "onnx", "cpu", cache_dir=d)
    assert f == model.encode_image and "falling back to the torch" in caplog.text
    with pytest.raises(OnnxBackendError, match="fp32 only"):
        image_encoder_for(model, "onnx", "cpu", precision="bf16")
    with pytest.raises(OnnxBackendError, match="CPU only"):
        image_encoder_for(model, "onnx", "cuda")


def test_missing_onnxruntime_is_a_clear_error(monkeypatch, model):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(OnnxBackendError, match="pip install onnxruntime onnx"):
        image_encoder_for(model, "onnx", "cpu")


def _gallery(tmp_path):
    img_dir = tmp_path / "images"
    rows, names = [], list(COLORS)
    for i, color in enumerate(names[:6]):
        poi = str(200 + i)
        for r, shape in enumerate((None, "圆", "方"), 1):
            write_image(solid_image(COLORS[color], (80 + 7 * r, 60), shape, seed=i * 3 + r), img_dir / f"{poi}_{r}.jpg")
            rows.append([poi, f"{color}色{shape or '山'}", f"http://x.invalid/{poi}_{r}", r, 0, 0, 0])
    csv_path = tmp_path / "recall.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return csv_path, img_dir


def _read_topk(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_recall_infer_backend_onnx_matches_torch(model, bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AVAS_ONNX_CACHE", str(tmp_path / "onnx_env"))
    csv_path, img_dir = _gallery(tmp_path)
    ckpt = tmp_path / "align.pth"
    save_align_checkpoint(model, ckpt)
    common = [
        "--csv",
        str(csv_path),
        "--image-dir",
        str(img_dir),
        "--checkpoint",
        str(ckpt),
        "--bert-dir",
        str(bert_dir),
        "--device",
        "cpu",
        "--topk",
        "5",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    out = {}
    for backend in ("torch", "onnx"):
        o = tmp_path / f"{backend}.csv"
        assert (
            recall_infer.main(
                common
                + ["--output", str(o), "--full-output", str(tmp_path / f"{backend}_full.csv"), "--backend", backend]
            )
            == 0
        )
        out[backend] = o
    t, o = _read_topk(out["torch"]), _read_topk(out["onnx"])
    assert len(t) == len(o) == 6 * 5
    assert [(r["poi_id"], r["rank"], r["image"]) for r in t] == [(r["poi_id"], r["rank"], r["image"]) for r in o]
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(t, o)) <= 1e-5
    meta = json.loads((tmp_path / "onnx.csv.meta.json").read_text(encoding="utf-8"))
    assert meta["backend"] == meta["image_backend"] == "onnx" and meta["onnx_max_abs_diff"] <= 1e-5
    assert len(list((tmp_path / "onnx_env").glob("image_*.onnx"))) == 1  # export went to the env dir
    # with --cache-dir the export lives under it, and the two backends share the vectors
    cache = tmp_path / "cache"
    assert (
        recall_infer.main(
            common + ["--output", str(tmp_path / "c1.csv"), "--cache-dir", str(cache), "--backend", "onnx"]
        )
        == 0
    )
    assert len(list((cache / "onnx").glob("image_*.onnx"))) == 1
    assert recall_infer.main(common + ["--output", str(tmp_path / "c2.csv"), "--cache-dir", str(cache)]) == 0
    meta2 = json.loads((tmp_path / "c2.csv.meta.json").read_text(encoding="utf-8"))
    assert meta2["images_encoded"] == 0 and meta2["images_cached"] == 18
    assert [r["image"] for r in _read_topk(tmp_path / "c2.csv")] == [r["image"] for r in o]


def test_encode_images_backend_onnx(model, bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AVAS_ONNX_CACHE", str(tmp_path / "onnx_env"))
    _, img_dir = _gallery(tmp_path)
    paths = sorted(img_dir.glob("*.jpg")) + [tmp_path / "missing.jpg"]
    ref, ok_ref = encode_images(model, paths, Encoding(batch_size=4, num_workers=0, progress=False))
    got, ok = encode_images(
        model,
        paths,
        Encoding(batch_size=4, num_workers=0, progress=False),
        engine=lambda: image_encoder_for(model, "onnx"),
    )
    assert torch.equal(ok, ok_ref) and ok.tolist() == [True] * 18 + [False]
    assert (got - ref).abs().max().item() <= 1e-5
    assert len(list((tmp_path / "onnx_env").glob("image_*.onnx"))) == 1
    with pytest.raises(ValueError, match="unknown backend"):
        image_encoder_for(model, "tensorrt")


def test_onnx_encoder_serves_one_lane_per_core(model, tmp_path):
    """The measured split (bench/bench_recall.py --split; utils.embed): one lane per core,
    each call on one engine thread; lanes=1 gives the one caller every core."""
    from models.engine.encode import cpu_cores, default_lanes

    n = cpu_cores()
    enc = OnnxImageEncoder(model, cache_dir=tmp_path)
    assert enc.lanes == default_lanes() and enc.opts.intra_op_num_threads == max(1, n // enc.lanes)
    one = OnnxImageEncoder(model, cache_dir=tmp_path, lanes=1)
    assert one.lanes == 1 and one.opts.intra_op_num_threads == n
