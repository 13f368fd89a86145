"""The text tower without transformers (2 s to import): a BERT encoder and WordPiece tokenizer with the
keys and computation of transformers' ``BertModel`` and ``BertTokenizer`` (tests/test_bert.py checks)."""

from __future__ import annotations

from utils.cli import DataError, UserError

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.io import read_json, text_lines

# Bounds of the size fields (also of Taiyi's configs): a wrong number would otherwise ask for terabytes.
SIZE_LIMITS = {
    "vocab_size": 1 << 20,
    "hidden_size": 1 << 14,
    "num_hidden_layers": 128,
    "num_attention_heads": 1 << 10,
    "intermediate_size": 1 << 16,
    "max_position_embeddings": 1 << 16,
    "type_vocab_size": 1 << 10,
    "projection_dim": 1 << 14,
    "num_labels": 1 << 14,
    "image_size": 1 << 12,
    "patch_size": 1 << 12,
}
MIN_POSITIONS = 50  # the texts' token limit (SPEC 2): fewer positions fail in the middle of a run


class ModelFilesError(UserError, FileNotFoundError):
    """A file a model needs (config, vocabulary) is missing."""


def model_file(directory: str | os.PathLike, name: str, hint: str) -> Path:
    path = Path(directory) / name
    if not path.is_file():
        raise ModelFilesError(f"{path}: missing; {hint}")
    return path


def check_sizes(where, config) -> None:
    for name, top in SIZE_LIMITS.items():
        v = getattr(config, name, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top):
            raise DataError(f"{where}: {name} = {v!r} is out of bounds (1 to {top})")
    if (positions := getattr(config, "max_position_embeddings", None)) is not None and positions < MIN_POSITIONS:
        raise DataError(f"{where}: max_position_embeddings = {positions}, fewer than {MIN_POSITIONS} tokens")
    size, heads = config.hidden_size, config.num_attention_heads
    if size % heads:
        raise DataError(f"{where}: hidden_size {size} is not a multiple of num_attention_heads {heads}")


def load_text_config(directory, hint: str, read=None):
    """The config of ``directory`` (``read``: its reader), sizes in bounds, vocab.txt within the embedding table."""
    path = model_file(directory, "config.json", hint)
    config = (read or BertConfig.from_json_file)(path)
    check_sizes(path, config)
    vocab = model_file(directory, "vocab.txt", hint)
    if (n := sum(1 for _ in text_lines(vocab))) > config.vocab_size:
        raise DataError(f"{vocab}: {n} tokens, more than vocab_size {config.vocab_size} of {path}")
    return config


@dataclass
class BertConfig:
    """The fields of a BERT ``config.json`` this encoder uses (others are ignored)."""

    vocab_size: int = 21128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BertConfig:
        """The config in ``path``; a ``DataError`` naming the file and field when unusable."""
        d = read_json(path)
        if not isinstance(d, dict):
            raise DataError(f"{path}: expected a JSON object, found {type(d).__name__}")
        cfg = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        check_sizes(path, cfg)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise DataError(f"{path}: {name} = {v!r} is not a valid value")
        if cfg.hidden_act != "gelu":
            raise DataError(f"{path}: hidden_act {cfg.hidden_act!r} is not supported (gelu only)")
        pad = cfg.pad_token_id
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < cfg.vocab_size:
            raise DataError(f"{path}: pad_token_id {pad!r} is not an id below vocab_size {cfg.vocab_size}")
        return cfg


def _dense_norm(d_in: int, c: BertConfig) -> nn.ModuleDict:
    """transformers' ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dropout(dense(x)) + skip)``."""
    return nn.ModuleDict(
        {"dense": nn.Linear(d_in, c.hidden_size), "LayerNorm": nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)}
    )


class _Layer(nn.Module):
    """One transformer layer; the ModuleDicts give the key names of transformers' wrapper modules."""

    def __init__(self, c: BertConfig):
        super().__init__()
        attention = nn.ModuleDict({k: nn.Linear(c.hidden_size, c.hidden_size) for k in ("query", "key", "value")})
        self.attention = nn.ModuleDict({"self": attention, "output": _dense_norm(c.hidden_size, c)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.intermediate_size)})
        self.output = _dense_norm(c.intermediate_size, c)
        self.heads, self.attention_dropout = c.num_attention_heads, c.attention_probs_dropout_prob
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = (
            self.attention.self[x](h).view(b, n, self.heads, -1).transpose(1, 2) for x in ("query", "key", "value")
        )
        p = self.attention_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1 / math.sqrt(d // self.heads))
        h = self._add_norm(self.attention.output, a.transpose(1, 2).reshape(b, n, d), h)
        return self._add_norm(self.output, F.gelu(self.intermediate.dense(h)), h)

    def _add_norm(self, m: nn.ModuleDict, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return m.LayerNorm(self.dropout(m.dense(x)) + skip)


class BertEncoder(nn.Module):
    """``forward(input_ids, attention_mask)``: the last hidden states (the pooler: for the checkpoint layout)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        c, d = config, config.hidden_size
        meta = torch.empty(0).is_meta  # built to be loaded: no init (torch's first on meta imports _dynamo: 1.9 s)

        def embedding(n: int, **kw) -> nn.Embedding:
            return nn.Embedding(n, d, _weight=torch.empty(n, d) if meta else None, **kw)

        self.embeddings = nn.ModuleDict(
            {
                "word_embeddings": embedding(c.vocab_size, padding_idx=c.pad_token_id),
                "position_embeddings": embedding(c.max_position_embeddings),
                "token_type_embeddings": embedding(c.type_vocab_size),
                "LayerNorm": nn.LayerNorm(d, eps=c.layer_norm_eps),
                "dropout": nn.Dropout(c.hidden_dropout_prob),
            }
        )
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))})
        self.pooler = nn.ModuleDict({"dense": nn.Linear(config.hidden_size, config.hidden_size)})
        if not meta:
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """BERT's initialisation (LayerNorms keep torch's): for a tower trained from scratch."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask, n = None, input_ids.shape[1]
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask[:, None, None, :].bool().expand(-1, 1, n, -1)
        e = self.embeddings
        h = e.word_embeddings(input_ids) + e.token_type_embeddings.weight[0]  # one segment
        h = e.dropout(e.LayerNorm(h + e.position_embeddings(torch.arange(n, device=input_ids.device))[None]))
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler.dense(hidden[:, 0]))


class BertTokenizer:
    """bert-base-chinese's tokenizer from its ``vocab.txt``, called like transformers' (longest padding, torch)."""

    def __init__(self, vocab_file: str | os.PathLike):
        from tokenizers import BertWordPieceTokenizer

        # id = line number; a repeated token keeps its last one
        vocab = {line.rstrip("\r\n"): i for i, line in enumerate(text_lines(vocab_file))}
        for special in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"):
            if special not in vocab:
                raise DataError(f"{vocab_file}: no {special} token in the vocabulary")
        self._tok = BertWordPieceTokenizer(vocab)  # its defaults are bert-base-chinese's settings
        self._tok.enable_padding(pad_id=vocab["[PAD]"])

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(int(i)) or "[UNK]" for i in ids]

    def __call__(self, texts, padding="longest", truncation=True, max_length=None, return_tensors="pt") -> dict:
        if padding not in ("longest", True) or return_tensors != "pt":
            raise ValueError("BertTokenizer pads to the longest text and returns torch tensors only")
        if truncation and max_length is not None:
            self._tok.enable_truncation(max_length)
        else:
            self._tok.no_truncation()
        encoded = self._tok.encode_batch([texts] if isinstance(texts, str) else list(texts))
        shape = (len(encoded), len(encoded[0].ids) if encoded else 0)
        return {
            "input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.long).reshape(shape),
            "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.long).reshape(shape),
        }
