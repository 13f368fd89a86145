"""The Taiyi-CLIP baseline: CLIP preprocessing against CLIPImageProcessor, the model
factory (align and taiyi), strict loading of the fine-tuned text encoder, and
recall_infer.py --model taiyi -> recall_eval.py end to end.

Everything is built here from hand-written configs: a tiny BERT text encoder with 16
logits and a tiny CLIP (vision hidden 32, 2 layers, patch 32, image 224, projection 16),
randomly initialised and saved in the Hugging Face layouts; no hub access.
"""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from fixtures import COLORS, TOKENS, solid_image, tiny_align, write_image
from PIL import Image
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, CLIPConfig, CLIPModel

import recall_eval
import recall_infer
from models.checkpoint import CheckpointError, save_align_checkpoint
from models.factory import MODELS, build_recall_model
from models.taiyi import load_taiyi
from utils.args import Encoding
from utils.evaluation.metrics import recall_at_k
from utils.formats.images import clip_tensor, load_clip_image
from utils.formats.rows import poi_of_image

CLIP_ZERO_TENSOR = clip_tensor(np.zeros((224, 224, 3), dtype=np.uint8))  # what an unreadable image becomes

DIM = 16

try:  # transformers 5: the PIL backend is the slow processor; 4.x: use_fast=False
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as _Proc

    def clip_processor():
        return _Proc()
except ImportError:  # pragma: no cover - transformers 4
    from transformers import CLIPImageProcessor

    def clip_processor():
        return CLIPImageProcessor(use_fast=False)


def _text_config():
    return BertConfig(
        vocab_size=len(TOKENS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=DIM,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _clip_config():
    return CLIPConfig(
        text_config={
            "vocab_size": 99,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=DIM,
    )


def _text_state(seed):
    torch.manual_seed(seed)
    return BertForSequenceClassification(_text_config()).eval().state_dict()


@pytest.fixture(scope="module")
def taiyi_dirs(tmp_path_factory):
    """Hugging Face-style directories: text (config, vocab, pytorch_model.bin), CLIP
    (config, model.safetensors of a whole CLIPModel), and a fine-tuned text state dict."""
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("taiyi")
    text = base / "taiyi-text"
    text.mkdir()
    _text_config().to_json_file(str(text / "config.json"))
    (text / "vocab.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    torch.save(_text_state(1), text / "pytorch_model.bin")
    clip = base / "clip"
    clip.mkdir()
    _clip_config().to_json_file(str(clip / "config.json"))
    torch.manual_seed(2)
    clip_model = CLIPModel(_clip_config()).eval()
    save_file({k: v.contiguous() for k, v in clip_model.state_dict().items()}, str(clip / "model.safetensors"))
    tuned = _text_state(3)
    tuned["bert.embeddings.position_ids"] = torch.arange(64)[None]  # as older transformers saved it
    torch.save(tuned, base / "finetuned.bin")
    return {
        "base": base,
        "text": text,
        "clip": clip,
        "clip_model": clip_model,
        "finetuned": base / "finetuned.bin",
        "tuned_state": tuned,
    }


def _ns(d, **kw):
    """The taiyi model's path options (models.factory.MODELS["taiyi"].options)."""
    return {
        "taiyi_text_dir": str(d["text"]),
        "clip_dir": str(d["clip"]),
        "taiyi_text_weights": str(d["finetuned"]),
        **kw,
    }


# ---------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------
def _rand(h, w, c, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


@pytest.mark.parametrize(
    "size", [(224, 224), (300, 200), (97, 411), (1024, 768), (225, 1000), (50, 30), (223, 224), (640, 641)]
)
def test_clip_preprocessing_equals_processor_rgb(size):
    w, h = size
    im = Image.fromarray(_rand(h, w, 3, w * h))
    ref = clip_processor()(images=im, return_tensors="pt")["pixel_values"][0]
    got = clip_tensor(np.asarray(im))
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, ref)


def test_clip_preprocessing_greyscale_palette_rgba_and_files(tmp_path):
    proc = clip_processor()
    ref = lambda im: proc(images=im, return_tensors="pt")["pixel_values"][0]  # noqa: E731
    grey = Image.fromarray(_rand(180, 260, 0, 1), mode="L")
    assert torch.equal(clip_tensor(np.asarray(grey.convert("RGB"))), ref(grey))
    pal = Image.fromarray(_rand(150, 330, 3, 2)).convert("P")
    assert torch.equal(clip_tensor(np.asarray(pal.convert("RGB"))), ref(pal))
    opaque = _rand(240, 200, 4, 3)
    opaque[..., 3] = 255
    rgba = Image.fromarray(opaque, mode="RGBA")
    assert torch.equal(clip_tensor(np.asarray(rgba.convert("RGB"))), ref(rgba))
    # translucent: the alpha channel is dropped, as the processors of the paper's time did
    # (transformers >= 5 composites onto white instead)
    trans = Image.fromarray(_rand(200, 300, 4, 4), mode="RGBA")
    assert torch.equal(clip_tensor(np.asarray(trans.convert("RGB"))), ref(trans.convert("RGB")))
    # through files, as the DataLoader sees them: PNG (RGBA, L) and JPEG
    for name, im in (("a.png", rgba), ("g.png", grey), ("c.jpg", Image.fromarray(_rand(333, 501, 3, 5)))):
        path = tmp_path / name
        im.save(path, quality=90) if name.endswith(".jpg") else im.save(path)
        x, ok = load_clip_image(path)
        assert ok and torch.equal(x, ref(Image.open(path).convert("RGB")))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    x, ok = load_clip_image(bad)
    assert not ok and torch.equal(x, CLIP_ZERO_TENSOR)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    assert torch.allclose(CLIP_ZERO_TENSOR, (-mean / std).expand(3, 224, 224))


# ---------------------------------------------------------------------------
# factory and loading
# ---------------------------------------------------------------------------
def test_factory_builds_both_models(taiyi_dirs, bert_dir, tmp_path):
    d = taiyi_dirs
    assert set(MODELS) >= {"align", "taiyi"}
    align = tiny_align(bert_dir, seed=4)
    save_align_checkpoint(align, tmp_path / "a.pth")
    ra = build_recall_model("align", checkpoint=str(tmp_path / "a.pth"), bert_dir=str(bert_dir))
    rt = build_recall_model("taiyi", **_ns(d))
    assert ra.identity().startswith("align:") and rt.identity().startswith("taiyi:")
    assert ra.identity() != rt.identity()
    imgs = [
        write_image(
            solid_image(c, size=(90 + 20 * i, 70), shape="圆" if i % 2 else "方", seed=i), tmp_path / f"{i}.jpg"
        )
        for i, c in enumerate(COLORS.values())
    ]
    texts = ["红色圆", "蓝色方形", "西湖古镇北京"]
    for rm in (ra, rt):
        e, ok = rm.encode_images(imgs, Encoding(batch_size=3, num_workers=0, progress=False))
        t = rm.encode_texts(texts, Encoding(text_batch_size=2))
        assert e.shape == (len(imgs), rm.embed_dim) and ok.all()
        assert t.shape == (3, rm.embed_dim)
        assert torch.allclose(e.norm(dim=1), torch.ones(len(imgs)), atol=1e-5)
        assert torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
        assert (e @ t.T).std() > 1e-3  # vectors depend on the inputs

    # taiyi image vectors = CLIPModel.get_image_features on the processor's pixels, normalised
    proc = clip_processor()
    with torch.no_grad():
        out = d["clip_model"].get_image_features(**proc(images=[Image.open(p) for p in imgs], return_tensors="pt"))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
    e, _ = rt.encode_images(imgs, Encoding(batch_size=4, num_workers=1, progress=False))
    assert torch.allclose(e, torch.nn.functional.normalize(feats, dim=1), atol=1e-5)
    # taiyi text vectors = the fine-tuned encoder's logits of each text alone, normalised
    enc = BertForSequenceClassification(_text_config()).eval()
    enc.load_state_dict({k: v for k, v in d["tuned_state"].items() if "position_ids" not in k})
    tok = BertTokenizer(str(d["text"] / "vocab.txt"))
    t = rt.encode_texts(texts, Encoding(text_batch_size=3))
    with torch.no_grad():
        for i, s in enumerate(texts):
            logits = enc(**tok([s], return_tensors="pt")).logits[0]
            assert torch.allclose(t[i], logits / logits.norm(), atol=1e-5)
    # without --taiyi-text-weights the directory's own weights are used
    base = build_recall_model("taiyi", **_ns(d, taiyi_text_weights=None))
    assert not torch.allclose(base.encode_texts(texts), t)
    assert base.identity() == rt.identity()  # the image tower is the same: shared image cache


def test_finetuned_weights_load_strictly(taiyi_dirs, tmp_path, caplog):
    d = taiyi_dirs
    with caplog.at_level(logging.INFO):
        model = load_taiyi(d["text"], d["clip"], d["finetuned"])
    assert "bert.embeddings.position_ids" in caplog.text  # tolerated and reported
    sd = model.text_model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in d["tuned_state"].items() if k in sd)
    # a renamed key: both names in the message
    bad = dict(d["tuned_state"])
    bad["classifier.weights"] = bad.pop("classifier.weight")
    torch.save(bad, tmp_path / "renamed.bin")
    with pytest.raises(CheckpointError) as e:
        load_taiyi(d["text"], d["clip"], tmp_path / "renamed.bin")
    assert "classifier.weight" in str(e.value) and "classifier.weights" in str(e.value)
    assert "renamed.bin" in str(e.value)
    # a wrong number of logits: a shape mismatch
    wrong = dict(d["tuned_state"])
    wrong["classifier.weight"] = torch.zeros(DIM + 1, 32)
    torch.save(wrong, tmp_path / "wrong.bin")
    with pytest.raises(CheckpointError, match="classifier.weight: checkpoint"):
        load_taiyi(d["text"], d["clip"], tmp_path / "wrong.bin")
    # a pickle that would run code is refused by the weights-only loader
    torch.save({"x": eval}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_taiyi(d["text"], d["clip"], tmp_path / "evil.bin")
    # a DDP-style "module." prefix is stripped
    torch.save({"module." + k: v for k, v in d["tuned_state"].items()}, tmp_path / "ddp.bin")
    m2 = load_taiyi(d["text"], d["clip"], tmp_path / "ddp.bin")
    assert torch.equal(m2.text_model.classifier.weight, model.text_model.classifier.weight)
    with pytest.raises(FileNotFoundError, match="--clip-dir"):
        load_taiyi(d["text"], tmp_path, d["finetuned"])


# ---------------------------------------------------------------------------
# recall_infer.py --model taiyi -> recall_eval.py
# ---------------------------------------------------------------------------
NAMES = {"201": "红色圆", "202": "蓝色方", "203": "绿色山", "204": "黄色海", "205": "紫色塔"}
COLOR_OF = {"201": "红", "202": "蓝", "203": "绿", "204": "黄", "205": "紫"}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    d = tmp_path_factory.mktemp("tgal")
    rows = []
    for pid, name in NAMES.items():
        for r in range(1, 4):
            rows.append([pid, name, f"https://example.invalid/{pid}_{r}", r, 96, 64, 1])
            write_image(
                solid_image(
                    COLORS[COLOR_OF[pid]],
                    size=(80 + 30 * r, 64 + 10 * r),
                    shape="圆" if r % 2 else "方",
                    seed=int(pid) + r,
                ),
                d / "images" / f"{pid}_{r}{'.png' if r == 2 else '.jpg'}",
            )
    (d / "images" / "203_3.jpg").write_bytes(b"broken")
    with open(d / "recall.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return d


def test_recall_infer_taiyi_end_to_end(taiyi_dirs, gallery, bert_dir, tmp_path, capsys):
    d, g = taiyi_dirs, gallery
    base = [
        "--csv",
        str(g / "recall.csv"),
        "--image-dir",
        str(g / "images"),
        "--device",
        "cpu",
        "--no-progress",
        "--batch-size",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    taiyi = [
        "--model",
        "taiyi",
        "--taiyi-text-dir",
        str(d["text"]),
        "--clip-dir",
        str(d["clip"]),
        "--taiyi-text-weights",
        str(d["finetuned"]),
    ]
    out = tmp_path / "taiyi.csv"
    assert (
        recall_infer.main(
            [
                *base,
                *taiyi,
                "--output",
                str(out),
                "--topk",
                "5",
                "--num-workers",
                "1",
                "--full-output",
                str(tmp_path / "taiyi_full.csv"),
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "taiyi.csv.meta.json").read_text(encoding="utf-8"))
    assert meta["model"] == "taiyi" and meta["gallery_size"] == 15 and meta["unreadable"] == 1
    assert meta["images_encoded"] == 15 and meta["model_sources"]["clip_dir"] == str(d["clip"])

    # scores = an independent computation with the reference models
    proc = clip_processor()
    with open(tmp_path / "taiyi_full.csv", newline="", encoding="utf-8") as f:
        full = [(p, img, float(s)) for p, _, img, s in csv.reader(f)]
    images = list(dict.fromkeys(img for _, img, _ in full))
    enc = BertForSequenceClassification(_text_config()).eval()
    enc.load_state_dict({k: v for k, v in d["tuned_state"].items() if "position_ids" not in k})
    tok = BertTokenizer(str(d["text"] / "vocab.txt"))
    with torch.no_grad():
        pix = []
        for p in images:
            try:
                pix.append(proc(images=Image.open(p), return_tensors="pt")["pixel_values"][0])
            except Exception:  # the broken file: the zero image
                pix.append(CLIP_ZERO_TENSOR)
        out_i = d["clip_model"].get_image_features(pixel_values=torch.stack(pix))
        ie = torch.nn.functional.normalize(getattr(out_i, "pooler_output", out_i), dim=1)
        te = torch.cat(
            [torch.nn.functional.normalize(enc(**tok([NAMES[p]], return_tensors="pt")).logits, dim=1) for p in NAMES]
        )
    ref = (te @ ie.T).numpy()
    got = np.array([s for _, _, s in full]).reshape(len(NAMES), -1)
    assert np.abs(got - ref).max() < 1e-5 and ref.std() > 1e-3

    # recall_eval on its output: the same figures as recall_at_k on the reference scores
    expect = recall_at_k(ref, list(NAMES), [poi_of_image(i) for i in images], (1, 5))
    assert recall_eval.main(["--results", str(out), "--k", "1", "5", "--bootstrap", "500"]) == 0
    printed = capsys.readouterr().out
    for k in (1, 5):
        assert f"recall@{k}: {expect[k]:.4f}" in printed

    # cache: keyed by model identity; the align model does not see taiyi's vectors
    align = tiny_align(bert_dir, seed=6)
    save_align_checkpoint(align, tmp_path / "a.pth")
    assert (
        recall_infer.main(
            [
                *base,
                "--checkpoint",
                str(tmp_path / "a.pth"),
                "--bert-dir",
                str(bert_dir),
                "--output",
                str(tmp_path / "align.csv"),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    ma = json.loads((tmp_path / "align.csv.meta.json").read_text(encoding="utf-8"))
    assert ma["model"] == "align" and ma["images_encoded"] == 15 and ma["images_cached"] == 0
    assert ma["weights_sha256"] != meta["weights_sha256"]
    assert (
        recall_infer.main(
            [*base, *taiyi, "--output", str(tmp_path / "taiyi2.csv"), "--topk", "5", "--num-workers", "0"]
        )
        == 0
    )
    m2 = json.loads((tmp_path / "taiyi2.csv.meta.json").read_text(encoding="utf-8"))
    assert m2["images_encoded"] == 0 and m2["images_cached"] == 15
    assert (tmp_path / "taiyi2.csv").read_text(encoding="utf-8") == out.read_text(encoding="utf-8")

    # the two models side by side
    assert (
        recall_eval.main(
            [
                "--compare",
                str(tmp_path / "align.csv"),
                str(out),
                "--k",
                "1",
                "5",
                "--bootstrap",
                "300",
                "--json",
                str(tmp_path / "cmp.json"),
            ]
        )
        == 0
    )
    cmp = json.loads((tmp_path / "cmp.json").read_text(encoding="utf-8"))
    assert cmp["n_pois"] == 5 and set(cmp["recall"]) == {"1", "5"}


def test_taiyi_options_are_required(gallery, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        recall_infer.main(
            [
                "--csv",
                str(gallery / "recall.csv"),
                "--image-dir",
                str(gallery / "images"),
                "--output",
                str(tmp_path / "o.csv"),
                "--model",
                "taiyi",
                "--taiyi-text-dir",
                str(tmp_path),
            ]
        )
    assert e.value.code == 2
    assert "--model taiyi needs --clip-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recall_infer.main(
            [
                "--csv",
                str(gallery / "recall.csv"),
                "--image-dir",
                str(gallery / "images"),
                "--output",
                str(tmp_path / "o.csv"),
            ]
        )
    assert "--model align needs --checkpoint, --bert-dir" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# download_assets.py --with-baselines and reproduce.py --with-baselines
# ---------------------------------------------------------------------------
def test_baseline_assets_download_and_reproduce_table(taiyi_dirs, gallery, bert_dir, tmp_path, capsys):
    import shutil

    from local_server import LocalServer

    import download_assets
    import reproduce
    from utils.fetch.assets import DEFAULT_MANIFEST, load_manifest, select_assets

    assets = {a.name: a for a in load_manifest(DEFAULT_MANIFEST)}
    chosen = {a.name for a in select_assets(list(assets.values()), None, groups=("baselines",))}
    assert set(reproduce.BASELINE_ASSETS) <= chosen and "recall_csv" in chosen
    assert "taiyi_text_weights" not in chosen  # the 411 MB original: only with --only
    assert not set(reproduce.BASELINE_ASSETS) & {a.name for a in select_assets(list(assets.values()))}

    # a mirror laid out like the manifest, holding the tiny models
    d, mirror = taiyi_dirs, tmp_path / "mirror"
    src = {
        "taiyi_text_config": d["text"] / "config.json",
        "taiyi_text_vocab": d["text"] / "vocab.txt",
        "taiyi_text_finetuned": d["finetuned"],
        "clip_config": d["clip"] / "config.json",
        "clip_weights": d["clip"] / "model.safetensors",
    }
    for name, path in src.items():
        (mirror / assets[name].path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, mirror / assets[name].path)
    (mirror / assets["taiyi_text_tokenizer_config"].path).write_text('{"do_lower_case": true}', encoding="utf-8")
    (mirror / assets["taiyi_text_special_tokens"].path).write_text(
        json.dumps(
            {
                "unk_token": "[UNK]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "mask_token": "[MASK]",
            }
        ),
        encoding="utf-8",
    )
    clip_processor().to_json_file(str(mirror / assets["clip_preprocessor_config"].path))
    dest, out = tmp_path / "dest", tmp_path / "out"
    with LocalServer(directory=mirror) as srv:
        assert (
            download_assets.main(
                ["--mirror", srv.base_url, "--dest", str(dest), "--no-progress", "--only", *reproduce.BASELINE_ASSETS]
            )
            == 0
        )
    for name in reproduce.BASELINE_ASSETS:
        assert (dest / assets[name].path).read_bytes() == (mirror / assets[name].path).read_bytes()

    # the recall world of reproduce.py: CSV, images, and our model's results
    (dest / assets["recall_csv"].path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(gallery / "recall.csv", dest / assets["recall_csv"].path)
    shutil.copytree(gallery / "images", dest / "data" / "images" / "recall")
    save_align_checkpoint(tiny_align(bert_dir, seed=7), tmp_path / "a.pth")
    (out / "recall").mkdir(parents=True)
    assert (
        recall_infer.main(
            [
                "--csv",
                str(gallery / "recall.csv"),
                "--image-dir",
                str(gallery / "images"),
                "--checkpoint",
                str(tmp_path / "a.pth"),
                "--bert-dir",
                str(bert_dir),
                "--output",
                str(out / "recall" / "top10.csv"),
                "--num-workers",
                "0",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        recall_eval.main(
            [
                "--results",
                str(out / "recall" / "top10.csv"),
                "--k",
                "1",
                "5",
                "10",
                "--json",
                str(out / "recall" / "metrics.json"),
                "--bootstrap",
                "200",
            ]
        )
        == 0
    )
    capsys.readouterr()

    assert (
        reproduce.main(
            [
                "--with-baselines",
                "--steps",
                "taiyi-infer,taiyi-eval",
                "--dest",
                str(dest),
                "--out-dir",
                str(out),
                "--device",
                "cpu",
                "--num-workers",
                "0",
                "--no-progress",
                "--no-html",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "step taiyi-infer: done" in text and "step taiyi-eval: done" in text
    tai = json.loads((out / "baseline" / "taiyi_metrics.json").read_text(encoding="utf-8"))
    cmp = json.loads((out / "baseline" / "compare.json").read_text(encoding="utf-8"))
    ours = json.loads((out / "recall" / "metrics.json").read_text(encoding="utf-8"))
    assert "Taiyi-CLIP paper" in text and "ours - Taiyi [95% CI]" in text
    row = next(line for line in text.splitlines() if line.startswith("| recall@5 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.7880" and float(cells[2]) == pytest.approx(ours["recall"]["5"], abs=1e-4)
    assert cells[4] == "-" and float(cells[5]) == pytest.approx(tai["recall"]["5"], abs=1e-4)
    diff = cmp["recall"]["5"]["B-A"]
    assert diff["value"] == pytest.approx(ours["recall"]["5"] - tai["recall"]["5"])
    assert cells[6].startswith(f"{diff['value']:+.4f} [{diff['ci'][0]:+.4f}")
    # a rerun skips both steps
    assert (
        reproduce.main(
            [
                "--with-baselines",
                "--steps",
                "taiyi-infer,taiyi-eval",
                "--dest",
                str(dest),
                "--out-dir",
                str(out),
                "--device",
                "cpu",
                "--num-workers",
                "0",
                "--no-progress",
                "--no-html",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "step taiyi-infer: skipped" in text and "step taiyi-eval: skipped" in text


def test_recall_infer_taiyi_decodes_in_workers_with_clip_preprocessing(taiyi_dirs, gallery, tmp_path):
    """CLIP's preprocessing (the model's image_loader) in a decoding worker process gives
    the output of decoding in the main process."""
    d, g = taiyi_dirs, gallery
    argv = [
        "--csv",
        str(g / "recall.csv"),
        "--image-dir",
        str(g / "images"),
        "--device",
        "cpu",
        "--no-progress",
        "--batch-size",
        "4",
        "--num-workers",
        "1",
        "--model",
        "taiyi",
        "--taiyi-text-dir",
        str(d["text"]),
        "--clip-dir",
        str(d["clip"]),
        "--taiyi-text-weights",
        str(d["finetuned"]),
        "--backend",
        "torch",  # ONNX Runtime's lanes decode in no worker process
    ]
    assert recall_infer.main([*argv, "--output", str(tmp_path / "a.csv")]) == 0
    assert recall_infer.main([*argv, "--num-workers", "0", "--output", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
