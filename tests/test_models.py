"""Foundation: model layout against SPEC, strict checkpoint loading, ranker formula."""

import json
import logging
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import TINY_ARCH, tiny_align, tiny_ranker

from models.align import AlignArch, AlignModel, contrastive_loss, load_tokenizer
from models.checkpoint import (
    CheckpointError,
    align_state_from,
    load_align_model,
    load_ranker,
    read_checkpoint,
    save_align_checkpoint,
    save_ranker_checkpoint,
)
from models.engine.encode import tokenize
from models.ranker import SiameseRanker
from utils.hashing import state_dict_hash

RANKER_HEAD_SHAPES = {
    "linear1.weight": (512, 1024),
    "linear3.weight": (512, 1536),
    "linear4.weight": (256, 512),
    "linear2.weight": (1, 256),
    "attention_layer.local_att.fc1.fc.0.weight": (64, 2048),
    "attention_layer.local_att.fc1.fc.1.bn.weight": (64,),
    "attention_layer.local_att.fc1.fc.1.bn.running_var": (64,),
    "attention_layer.local_att.fc1.fc.3.weight": (16, 64),
    "attention_layer.local_att.fc2.fc.0.weight": (1, 16),
}


@pytest.fixture(scope="module")
def full_ranker(real_bert_dir):
    """The full-size ranker (with its full-size recall model), built once."""
    return SiameseRanker(AlignModel.from_bert_dir(real_bert_dir))


def test_full_size_recall_model_matches_spec(full_ranker):
    sd = full_ranker.align_model.state_dict()
    assert len(sd) == 650
    assert sum(v.numel() for v in sd.values()) == pytest.approx(57.8e6, rel=1e-3)
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"logit_scale", "image_model", "text_model", "image_hidden_layer", "text_hidden_layer"}
    assert sd["logit_scale"].shape == () and sd["logit_scale"].item() == 1.0
    assert sd["image_model._conv_stem.weight"].shape == (40, 3, 3, 3)  # B3 stem
    assert sd["image_model._fc.weight"].shape == (512, 1536)
    assert sd["image_hidden_layer.weight"].shape == (512, 512)
    assert sd["text_hidden_layer.weight"].shape == (512, 768)
    assert sd["text_model.embeddings.word_embeddings.weight"].shape == (21128, 768)
    assert "text_model.pooler.dense.weight" in sd
    layers = {k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layer.")}
    assert layers == {"0", "1", "2", "3"}
    for name in ("_conv_stem", "_bn0", "_blocks.0.", "_blocks.25.", "_conv_head", "_bn1", "_fc"):
        assert any(k.startswith("image_model." + name) for k in sd), name
    assert not any(k.startswith("image_model._blocks.26.") for k in sd)


def test_full_size_ranker_head_matches_spec(full_ranker):
    sd = full_ranker.state_dict()
    head = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("align_model.")}
    for k, shape in RANKER_HEAD_SHAPES.items():
        assert head[k] == shape, k
    assert len(head) == 19 and not any("alpha" in k for k in head)
    assert full_ranker.attention_layer.local_att.fc1.fc[1].bn.eps == 1e-9
    assert len([k for k in sd if k.startswith("align_model.")]) == 650


def test_full_size_encoders_run(full_ranker, real_bert_dir):
    model = full_ranker.align_model.eval()
    tok = load_tokenizer(real_bert_dir)
    batch = tokenize(tok, ["北海海底世界", "漠河,北极村,白桦林 Hello"])
    assert tok.convert_ids_to_tokens(batch["input_ids"][1])[-2] == "hello"  # lower-cased
    with torch.inference_mode():
        t = model.encode_text(**batch)
        v = model.encode_image(torch.randn(1, 3, 224, 224))
    assert t.shape == (2, 512) and v.shape == (1, 512)
    assert torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)


def test_model_built_to_be_loaded_skips_init_without_importing_dynamo(bert_dir):
    """Under the meta device nothing of the ranker (its recall model included) is initialised: torch's first
    init on meta imports torch._dynamo (2 s of every script's start-up); on a CPU BERT's own init still runs."""
    code = (
        "import sys, torch\n"
        "from models.align import AlignModel\n"
        "from models.ranker import SiameseRanker\n"
        "with torch.device('meta'):\n"
        f"    m = SiameseRanker(AlignModel.from_bert_dir({str(bert_dir)!r}))\n"
        "print(m.linear1.weight.is_meta, 'torch._dynamo' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
    torch.manual_seed(0)
    emb = AlignModel.from_bert_dir(bert_dir).text_model.embeddings.word_embeddings
    std = AlignModel.from_bert_dir(bert_dir).text_model.config.initializer_range
    w = emb.weight.detach()  # a parameter's float() warns
    assert float(w[emb.padding_idx].abs().max()) == 0
    assert abs(float(w.std()) - std) < std * 0.2


def test_truncation_at_50_tokens(bert_dir):
    batch = tokenize(load_tokenizer(bert_dir), ["红" * 200, "蓝"])
    assert batch["input_ids"].shape == (2, 50)
    assert batch["attention_mask"][1].sum() == 3


def test_round_trip_authors_format(tmp_path, bert_dir):
    model = tiny_align(bert_dir, seed=3)
    path = tmp_path / "align_model.pth"
    save_align_checkpoint(model, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "arch"} and len(raw["state_dict"]) == len(model.state_dict())
    loaded = load_align_model(path, bert_dir)
    assert loaded.arch == TINY_ARCH
    images = torch.randn(2, 3, 224, 224)
    text = tokenize(load_tokenizer(bert_dir), ["红色圆形", "蓝色"])
    with torch.inference_mode():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(**text), loaded.encode_text(**text))
    # a bare state dict loads too, given the architecture
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    bare = load_align_model(tmp_path / "bare.pth", bert_dir, arch=TINY_ARCH)
    assert state_dict_hash(bare.state_dict()) == state_dict_hash(model.state_dict())


def _save_wrapped(sd, path):
    torch.save({"state_dict": sd}, path)
    return path


def test_foreign_key_is_an_error(tmp_path, bert_dir):
    sd = tiny_align(bert_dir).state_dict()
    sd["classifier.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_align_model(_save_wrapped(sd, tmp_path / "x.pth"), bert_dir, arch=TINY_ARCH)
    assert "unexpected keys (1): classifier.weight" in str(e.value)
    assert str(tmp_path / "x.pth") in str(e.value)


def test_missing_key_is_an_error(tmp_path, bert_dir):
    sd = tiny_align(bert_dir).state_dict()
    del sd["text_hidden_layer.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): text_hidden_layer.bias"):
        load_align_model(_save_wrapped(sd, tmp_path / "x.pth"), bert_dir, arch=TINY_ARCH)


def test_wrong_shape_is_an_error(tmp_path, bert_dir):
    sd = tiny_align(bert_dir).state_dict()
    sd["image_hidden_layer.weight"] = torch.zeros(32, 31)
    with pytest.raises(CheckpointError, match=r"image_hidden_layer.weight: checkpoint \(32, 31\) vs model \(32, 32\)"):
        load_align_model(_save_wrapped(sd, tmp_path / "x.pth"), bert_dir, arch=TINY_ARCH)


def test_full_size_checkpoint_into_tiny_model_lists_keys(tmp_path, bert_dir):
    sd = tiny_align(bert_dir).state_dict()
    with pytest.raises(CheckpointError, match="--arch"):
        load_align_model(_save_wrapped(sd, tmp_path / "x.pth"), bert_dir)  # default = full size


def test_benign_extras_load_with_notice(tmp_path, bert_dir, caplog):
    model = tiny_align(bert_dir, seed=5)
    sd = dict(model.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(64)[None]
    sd["relations_emb.weight"] = torch.randn(4, 100)
    sd["linear_relation.weight"] = torch.randn(32, 100)
    sd["linear_relation.bias"] = torch.randn(32)
    with caplog.at_level(logging.INFO, logger="models.checkpoint"):
        loaded = load_align_model(_save_wrapped(sd, tmp_path / "x.pth"), bert_dir, arch=TINY_ARCH)
    assert "ignored 4 tensors" in caplog.text and "relations_emb.weight" in caplog.text
    assert state_dict_hash(loaded.state_dict()) == state_dict_hash(model.state_dict())


def test_code_in_checkpoint_is_refused(tmp_path, bert_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(path)


def test_missing_file_and_bert_dir_errors(tmp_path, bert_dir):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="config.json"):
        AlignModel.from_bert_dir(tmp_path)


def test_ranker_checkpoint_restores_its_recall_copy(tmp_path, bert_dir):
    ranker = tiny_ranker(bert_dir, seed=7)
    path = tmp_path / "ranker.ckpt"
    save_ranker_checkpoint(ranker, path)
    raw = torch.load(path, weights_only=True)
    assert "state_dict" not in raw and any(k.startswith("align_model.") for k in raw)
    loaded = load_ranker(path, bert_dir)  # arch from the sidecar
    assert state_dict_hash(loaded.state_dict()) == state_dict_hash(ranker.state_dict())
    # the recall loader accepts the ranker file and takes its copy
    align = load_align_model(path, bert_dir)
    assert state_dict_hash(align.state_dict()) == state_dict_hash(ranker.align_model.state_dict())
    # --align-checkpoint replaces the copy
    other = tiny_align(bert_dir, seed=99)
    save_align_checkpoint(other, tmp_path / "other.pth")
    replaced = load_ranker(path, bert_dir, align_checkpoint=tmp_path / "other.pth")
    assert state_dict_hash(replaced.align_model.state_dict()) == state_dict_hash(other.state_dict())
    assert torch.equal(replaced.linear3.weight, ranker.linear3.weight)


def test_ranker_benign_extras_under_prefix(tmp_path, bert_dir):
    ranker = tiny_ranker(bert_dir)
    sd = dict(ranker.state_dict())
    sd["align_model.relations_emb.weight"] = torch.zeros(4, 100)
    torch.save(sd, tmp_path / "r.ckpt")
    load_ranker(tmp_path / "r.ckpt", bert_dir, arch=TINY_ARCH)
    sd["relations_emb.weight"] = torch.zeros(4, 100)  # at the wrong depth: foreign
    torch.save(sd, tmp_path / "r2.ckpt")
    with pytest.raises(CheckpointError, match="unexpected keys \\(1\\): relations_emb.weight"):
        load_ranker(tmp_path / "r2.ckpt", bert_dir, arch=TINY_ARCH)


def test_ranker_score_matches_spec_formula(bert_dir):
    torch.manual_seed(0)
    model = tiny_ranker(bert_dir, seed=11)
    with torch.no_grad():  # non-trivial BN affine too (tiny_ranker already sets its running stats)
        model.attention_layer.local_att.fc1.fc[1].bn.weight.uniform_(0.5, 1.5)
        model.attention_layer.local_att.fc1.fc[1].bn.bias.uniform_(-0.3, 0.3)
    d, b = TINY_ARCH.embed_dim, 6
    images = torch.randn(b, 3, 224, 224)
    pois_feature = F.normalize(torch.randn(b, d), dim=1)
    poi_img, poi_txt = torch.randn(b, 5, d), torch.randn(b, 5, d)
    poi_len = torch.tensor([0, 1, 2, 3, 5, 5])
    with torch.inference_mode():
        got = model(images, pois_feature, poi_img, poi_txt, poi_len)

        # direct computation of SPEC section 5, one item at a time
        att = model.attention_layer.local_att
        lin_a, bn, lin_b = att.fc1.fc[0], att.fc1.fc[1].bn, att.fc1.fc[3]
        lin_c = att.fc2.fc[0]
        v_all = F.normalize(model.align_model.image_hidden_layer(model.align_model.image_model(images)), dim=1)
        for i in range(b):
            v = v_all[i]
            P = model.linear1(torch.cat([poi_img[i], poi_txt[i]], dim=-1))  # 5 x d
            q = v.expand(5, d)
            x = lin_a(torch.cat([q, P, q - P, q * P], dim=-1))  # 5 x 64
            bn_x = (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-9) * bn.weight + bn.bias
            x = torch.sigmoid(bn_x) * x  # Dice, alpha = 0
            w = lin_c(lin_b(x))  # 5 x 1, no softmax
            w = w * (torch.arange(5) < poi_len[i]).float()[:, None]
            pooled = (w * P).sum(0)
            h = torch.cat([v, pois_feature[i], pooled])
            s = model.linear2(torch.relu(model.linear4(torch.relu(model.linear3(h)))))
            assert torch.allclose(got[i], s, atol=1e-5), i
    # no POI: pooled vector is exactly zero, so the score ignores the POI vectors
    with torch.inference_mode():
        a = model(images[:1], pois_feature[:1], poi_img[:1], poi_txt[:1], torch.tensor([0]))
        b2 = model(images[:1], pois_feature[:1], torch.zeros_like(poi_img[:1]), poi_txt[:1] * 0, torch.tensor([0]))
    assert torch.equal(a, b2)


def test_contrastive_loss_is_symmetric_ce():
    sims = torch.tensor([[2.0, 0.1, 0.3], [0.2, 1.5, 0.0], [0.4, 0.3, 1.0]])
    want = (F.cross_entropy(sims, torch.arange(3)) + F.cross_entropy(sims.t(), torch.arange(3))) / 2
    assert torch.allclose(contrastive_loss(sims), want)


def test_logit_scale_is_a_plain_multiplier(bert_dir):
    model = tiny_align(bert_dir)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    a, t = F.normalize(torch.randn(4, 32), dim=1), F.normalize(torch.randn(4, 32), dim=1)
    assert torch.allclose(model.similarity(a, t), a @ t.t() * 3.0)


def test_arch_json_round_trip(tmp_path):
    p = tmp_path / "arch.json"
    p.write_text('{"image_model": "efficientnet-b0", "text_layers": 2, "embed_dim": 64}')
    arch = AlignArch.from_json(p)
    assert arch.embed_dim == 64 and not arch.is_default and AlignArch().is_default
    p.write_text('{"layers": 2}')
    with pytest.raises(ValueError, match="layers"):
        AlignArch.from_json(p)


def test_tokenizer_lower_cases_like_the_authors(bert_dir):
    """Built from vocab.txt alone, as the authors did: lower-casing on, CJK split per char."""
    tok = load_tokenizer(bert_dir)
    ids = tokenize(tok, ["红A B"])["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "红", "a", "b", "[SEP]"]


# ---------------------------------------------------------------------------
# known checkpoint wrappers (issue 14, item 9): recognised with a notice, strict otherwise
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "wrap,note",
    [
        (lambda sd: {"module." + k: v for k, v in sd.items()}, "every key under 'module.' (DataParallel/DDP)"),
        (lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}}, "'module.'"),
        (lambda sd: {"model": sd, "epoch": 3}, '{"model": ...}'),
        (lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, '{"state_dict": ...} with epoch'),
        (
            lambda sd: {
                "state_dict": {"model." + k: v for k, v in sd.items()},
                "epoch": 2,
                "global_step": 7,
                "pytorch-lightning_version": "2.4.0",
            },
            "every key under 'model.' (Lightning)",
        ),
    ],
)
def test_known_wrappers_load_with_a_notice(tmp_path, bert_dir, caplog, wrap, note):
    model = tiny_align(bert_dir, seed=6)
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(model.state_dict()), path)
    with caplog.at_level(logging.INFO, logger="models.checkpoint"):
        loaded = load_align_model(path, bert_dir, arch=TINY_ARCH)
    assert "a wrapped checkpoint" in caplog.text and note in caplog.text and str(path) in caplog.text
    assert state_dict_hash(loaded.state_dict()) == state_dict_hash(model.state_dict())


def test_wrapped_ranker_checkpoint(tmp_path, bert_dir):
    ranker = tiny_ranker(bert_dir, seed=8)
    torch.save({"module." + k: v for k, v in ranker.state_dict().items()}, tmp_path / "ddp.ckpt")
    loaded = load_ranker(tmp_path / "ddp.ckpt", bert_dir, arch=TINY_ARCH)
    assert state_dict_hash(loaded.state_dict()) == state_dict_hash(ranker.state_dict())


def test_partial_prefix_is_not_unwrapped(tmp_path, bert_dir):
    sd = tiny_align(bert_dir).state_dict()
    sd = {("module." + k if k.startswith("text_model.") else k): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): module\.text_model\."):
        load_align_model(_save_wrapped(sd, tmp_path / "x.pth"), bert_dir, arch=TINY_ARCH)
    torch.save({"model": {"weights": {"a": torch.zeros(1)}}}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        read_checkpoint(tmp_path / "nested.pth")


def test_align_state_from_is_the_one_prefix_strip(bert_dir):
    ranker = tiny_ranker(bert_dir, seed=2)
    sd = ranker.state_dict()
    got = align_state_from(sd)
    assert set(got) == set(ranker.align_model.state_dict())
    plain = ranker.align_model.state_dict()
    assert align_state_from(plain) is plain


def test_loaded_model_is_built_without_wasted_init_and_equals_the_file(tmp_path, bert_dir):
    model = tiny_align(bert_dir, seed=9)
    save_align_checkpoint(model, tmp_path / "a.pth")
    loaded = load_align_model(tmp_path / "a.pth", bert_dir)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in loaded.parameters())  # trainable after loading, as before
    # a half-precision file still gives the float32 model, as copying into it did
    torch.save(
        {
            "state_dict": {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()},
            "arch": asdict(model.arch),
        },
        tmp_path / "half.pth",
    )
    half = load_align_model(tmp_path / "half.pth", bert_dir)
    assert {p.dtype for p in half.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------
# .safetensors: read wherever a checkpoint is; convert_weights.py writes it
# ---------------------------------------------------------------------------
def test_safetensors_conversion_keeps_keys_tensors_and_architecture(tmp_path, bert_dir, capsys):
    import convert_weights

    ranker = tiny_ranker(bert_dir, seed=5)
    save_ranker_checkpoint(ranker, tmp_path / "r.ckpt")  # a bare state dict, its arch in a sidecar
    assert convert_weights.main([str(tmp_path / "r.ckpt"), str(tmp_path / "r.safetensors")]) == 0
    assert "r.safetensors: " in capsys.readouterr().out
    sd, _ = read_checkpoint(tmp_path / "r.ckpt")
    got, meta = read_checkpoint(tmp_path / "r.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    assert meta["arch"] == asdict(TINY_ARCH)  # no sidecar needed beside the new file
    loaded = load_ranker(tmp_path / "r.safetensors", bert_dir)
    assert state_dict_hash(loaded.state_dict()) == state_dict_hash(ranker.state_dict())
    # the recall model's file ({"state_dict", "arch"}), and a ranker's recall copy from safetensors
    align = tiny_align(bert_dir, seed=6)
    save_align_checkpoint(align, tmp_path / "a.pth")
    assert convert_weights.main([str(tmp_path / "a.pth"), str(tmp_path / "a.safetensors")]) == 0
    for path in ("a.safetensors", "r.safetensors"):
        want = align if path == "a.safetensors" else ranker.align_model
        got_align = load_align_model(tmp_path / path, bert_dir)
        assert state_dict_hash(got_align.state_dict()) == state_dict_hash(want.state_dict())
    with_copy = load_ranker(tmp_path / "r.ckpt", bert_dir, align_checkpoint=tmp_path / "a.safetensors")
    assert state_dict_hash(with_copy.align_model.state_dict()) == state_dict_hash(align.state_dict())


def test_bad_safetensors_files_are_named(tmp_path, bert_dir):
    from safetensors.torch import save_file

    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: cannot be read as safetensors"):
        read_checkpoint(tmp_path / "cut.safetensors")
    sd = {k: v.clone() for k, v in tiny_align(bert_dir, seed=6).state_dict().items()}
    sd["text_hidden_layer.bias"][2] = float("inf")
    save_file(sd, str(tmp_path / "inf.safetensors"), metadata={"arch": json.dumps(asdict(TINY_ARCH))})
    with pytest.raises(CheckpointError, match=r"inf\.safetensors: tensor text_hidden_layer\.bias holds NaN"):
        load_align_model(tmp_path / "inf.safetensors", bert_dir)
