"""The package's own text tower (models/bert.py) against transformers' BertModel and
BertTokenizer, which it replaces at run time: same state-dict keys, same hidden states
(1e-5; ~1e-6 in practice) with and without padding, same dropout sites in training, and
the same token ids on the published CSVs' texts and on awkward strings."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from utils.cli import DataError  # noqa: E402

from models.bert import BertConfig, BertEncoder, BertTokenizer  # noqa: E402

CFG = dict(
    vocab_size=120,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def _pair(seed=0):
    torch.manual_seed(seed)
    ref = transformers.BertModel(transformers.BertConfig(**CFG), add_pooling_layer=True).eval()
    ours = BertEncoder(BertConfig(**CFG)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_same_state_dict_keys_and_shapes():
    ref, ours = _pair()
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b


@pytest.mark.parametrize("padded", [False, True])
def test_same_hidden_states(padded):
    ref, ours = _pair(1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, CFG["vocab_size"], (5, 17), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for i, n in enumerate((17, 9, 3, 1, 12)):
            mask[i, n:] = 0
            ids[i, n:] = 0
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        pooled_want = ref(input_ids=ids, attention_mask=mask).pooler_output
        pooled = ours.pooled(got)
    keep = mask.bool()
    assert (got - want)[keep].abs().max().item() <= 1e-5
    assert (pooled - pooled_want).abs().max().item() <= 1e-5


def test_training_mode_has_dropout_and_gradients():
    _, ours = _pair(3)
    ours.train()
    ids = torch.randint(1, CFG["vocab_size"], (4, 10))
    a, b = ours(ids, torch.ones_like(ids)), ours(ids, torch.ones_like(ids))
    assert not torch.equal(a, b)  # dropout is on
    a.sum().backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if not n.startswith("pooler"))


def test_fresh_weights_follow_bert_init_and_the_meta_device_draws_nothing():
    torch.manual_seed(0)
    m = BertEncoder(BertConfig(**CFG))
    w = m.encoder.layer[0].attention.self.query.weight
    assert abs(w.std().item() - 0.02) < 0.005 and m.encoder.layer[0].intermediate.dense.bias.abs().max() == 0
    assert m.embeddings.word_embeddings.weight[0].abs().max() == 0  # the padding row
    with torch.device("meta"):  # how the checkpoint loader builds a model whose weights it loads next
        torch.nn.Linear(4, 4)  # no error, nothing drawn
        before = torch.random.get_rng_state()
        BertEncoder(BertConfig(**CFG))
        assert torch.equal(before, torch.random.get_rng_state())


def test_config_errors_name_the_file_and_field(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**CFG, "num_attention_heads": 5}), encoding="utf-8")
    with pytest.raises(DataError, match="config.json.*multiple"):
        BertConfig.from_json_file(p)
    p.write_text(json.dumps({**CFG, "hidden_size": "big"}), encoding="utf-8")
    with pytest.raises(DataError, match="hidden_size"):
        BertConfig.from_json_file(p)
    p.write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="config.json:1"):
        BertConfig.from_json_file(p)
    p.write_text(json.dumps({**CFG, "hidden_act": "relu"}), encoding="utf-8")
    with pytest.raises(DataError, match="hidden_act"):
        BertConfig.from_json_file(p)


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------
AWKWARD = [
    "",
    " ",
    "北海海底世界",
    "漠河,北极村,白桦林 Hello",
    "ÉCOLE Café naïve",
    "ＡＢＣ１２３全角",
    "tab\tand\nnewline",
    "zero\u200bwidth",
    "ctrl\x07char\x00",
    "emoji 🎉🏔️ ok",
    "a-b_c.d#e",
    "【杭州】西湖·灵隐寺（一日游）",
    "Mix中English混合text",
    "[UNK] [SEP] literal",
    "x" * 150,
    "supercalifragilisticexpialidocious",
    "ǅǈ ŉ ß İ",
    "한국어 日本語 ภาษาไทย",
    "\ufffdbad\ufffd",
    "红" * 80,
]


def _compare(vocab_file, texts, max_length=50):
    ref = transformers.BertTokenizer(str(vocab_file))
    ours = BertTokenizer(vocab_file)
    for i in range(0, len(texts), 64):
        batch = texts[i : i + 64]
        want = ref(batch, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        got = ours(batch, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        for k in ("input_ids", "attention_mask"):
            if not torch.equal(got[k], want[k]):
                bad = [t for t, a, b in zip(batch, got[k], want[k]) if not torch.equal(a, b)]
                pytest.fail(f"{k} differ for {bad[:3]!r}")


def test_tokenizer_matches_on_awkward_strings(bert_dir, real_bert_dir_or_none):
    _compare(bert_dir / "vocab.txt", AWKWARD)
    if real_bert_dir_or_none is not None:
        _compare(real_bert_dir_or_none / "vocab.txt", AWKWARD)
        _compare(real_bert_dir_or_none / "vocab.txt", AWKWARD, max_length=8)


@pytest.fixture()
def real_bert_dir_or_none(request):
    from conftest import SEED_DATA

    d = SEED_DATA / "bert-base-chinese"
    return d if (d / "vocab.txt").is_file() else None


def test_tokenizer_matches_on_the_published_texts(seed_data):
    """Every POI name of the recall set and every title / POI list of the ranking set."""
    texts = []
    with open(seed_data / "temp_recall_biztype0_fc5_imagern_500.csv", encoding="utf-8", newline="") as f:
        texts += sorted({row[1] for row in csv.reader(f) if len(row) > 1})
    with open(seed_data / "dwd_mml_train_dataset_1007_urls_val_with_poi_tuomin.csv", encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("$record$")
            texts += [p for p in parts[5:] if p and not p.startswith("http")][:3]
    assert len(texts) > 1000
    rng = np.random.default_rng(0)
    joined = [" ".join(rng.choice(texts, 3)) for _ in range(300)]  # long ones: truncation
    _compare(seed_data / "bert-base-chinese" / "vocab.txt", texts + joined)


def test_vocab_errors_name_the_file(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("[PAD]\n[CLS]\n[SEP]\n红\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"vocab.txt: no \[UNK\] token"):
        BertTokenizer(p)
    p.write_bytes(b"[PAD]\n[UNK]\n\xff\xfe\n")
    with pytest.raises(DataError, match="vocab.txt"):
        BertTokenizer(p)
