"""Small, self-made fixtures shared by the tests: a tiny BERT directory (config +
vocab), a tiny architecture, tiny models and generated images. Nothing here needs
../shared or the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.align import AlignArch, AlignModel
from models.ranker import SiameseRanker
from utils.formats.images import to_tensor

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list("红绿蓝黄黑白紫橙色圆方形三角星心山海湖岛塔桥寺城园公古镇北京上杭州西世界乐底大小")
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
TOKENS = SPECIALS + [",", ".", "-", "#", "_"] + LETTERS + ["##" + c for c in LETTERS] + CHARS

TINY_BERT_CONFIG = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "attention_probs_dropout_prob": 0.0,
    "hidden_dropout_prob": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 12,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "vocab_size": len(TOKENS),
}
TINY_ARCH = AlignArch(
    image_model="efficientnet-b0",
    image_overrides={"width_coefficient": 0.25, "depth_coefficient": 0.25},
    text_layers=1,
    embed_dim=32,
)

COLORS = {
    "红": (220, 30, 30),
    "绿": (30, 200, 40),
    "蓝": (30, 60, 220),
    "黄": (230, 220, 20),
    "黑": (10, 10, 10),
    "白": (245, 245, 245),
    "紫": (150, 40, 200),
    "橙": (250, 140, 20),
}


def make_bert_dir(path: str | os.PathLike) -> Path:
    """A tiny bert-base-chinese look-alike: config.json (12 layers, overridden on
    load) and a vocab.txt of a few dozen tokens."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_BERT_CONFIG, indent=2), encoding="utf-8")
    (path / "vocab.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    return path


def calibrate_image_tower(model: AlignModel, seed: int = 0, batches: int = 3) -> AlignModel:
    """Make a randomly initialised image tower image-dependent in eval mode.

    With PyTorch's default conv init the signal vanishes through the EfficientNet
    blocks, so in eval mode (BN running stats 0/1) every image gets the same vector.
    Re-initialise the convs as EfficientNet does (He normal, fan-out) and set the BN
    running statistics from a few random batches.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.image_model.modules():
        if isinstance(m, torch.nn.Conv2d):
            with torch.no_grad():
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=g)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model.image_model(torch.randn(8, 3, 224, 224, generator=g))
    for m in model.image_model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def tiny_align(bert_dir, seed: int = 0, arch: AlignArch = TINY_ARCH) -> AlignModel:
    """A tiny, randomly initialised alignment model whose image vectors depend on
    the image (see calibrate_image_tower)."""
    torch.manual_seed(seed)
    return calibrate_image_tower(AlignModel.from_bert_dir(bert_dir, arch), seed)


def tiny_ranker(bert_dir, seed: int = 0) -> SiameseRanker:
    model = SiameseRanker(tiny_align(bert_dir, seed))
    torch.manual_seed(seed + 1)
    # give BN running stats non-trivial values so the eval path is really exercised
    bn = model.attention_layer.local_att.fc1.fc[1].bn
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def solid_image(color, size=(96, 64), shape: str | None = None, seed: int = 0) -> Image.Image:
    """A coloured image with a little noise, optionally with a white shape on it."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.int16)
    arr[:] = color
    arr += rng.integers(-20, 21, size=arr.shape, dtype=np.int16)
    if shape == "圆":
        yy, xx = np.mgrid[:h, :w]
        arr[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(w, h) / 3) ** 2] = 255
    elif shape == "方":
        arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_image(img: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "PNG")
    img.save(path, format=fmt, quality=92) if fmt == "JPEG" else img.save(path, format=fmt)
    return path


def calibrate_image_bn(align, images):
    """Give the image tower's BatchNorm layers running statistics from real images.
    A randomly initialised EfficientNet in eval mode (running mean 0, var 1) shrinks the
    signal block after block until every image gets the same vector; calibrated, the
    vectors differ between images, so the tests see the image path."""
    x = torch.stack([to_tensor(np.asarray(im.convert("RGB"))) for im in images])
    bns = [m for m in align.image_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    align.image_model.train()
    with torch.no_grad():
        align.image_model(x)
    align.eval()
    return align


def png_bytes(img) -> bytes:
    """A PIL image as PNG file content (what a test server answers)."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
