"""Taiyi-CLIP, the paper's recall baseline: a Chinese RoBERTa text encoder paired with the
image tower of OpenAI CLIP ViT-B/32.

* Text: ``BertForSequenceClassification`` of ``IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese``;
  its ``num_labels`` (512) logits ARE the text vector (model card:
  ``text_encoder(text).logits``). The authors fine-tuned it on their data and published
  the weights as a ``pytorch_model.bin`` that replaces the model's own
  (``--taiyi-text-weights``).
* Image: ``vision_model`` + ``visual_projection`` of ``openai/clip-vit-base-patch32``,
  i.e. what ``CLIPModel.get_image_features`` computes; its preprocessing is in
  ``utils/clip_images.py``.
* Both vectors are L2-normalised and compared by cosine.

Loading is from local directories only (no hub access): the configs are read from
``config.json`` and the weights are loaded with ``torch.load(weights_only=True)`` (or
safetensors) and strict key checking (``models.checkpoint.load_state``): anything
missing, unexpected or of the wrong shape is an error naming the keys. Tolerated and
reported: persisted ``position_ids`` buffers of older transformers, and the CLIP text
tower (``text_model.*``, ``text_projection``, ``logit_scale``) which is not used.

Texts are tokenised as the authors' recall script did for their own model: padding to
the longest text of the batch, truncation at 50 tokens, with the attention mask (so a
text's vector does not depend on the batch: the same as encoding each name alone).
"""

from __future__ import annotations

from utils.cli import DataError

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .align import ModelFilesError, skip_init
from .checkpoint import CheckpointError, load_state, read_checkpoint

log = logging.getLogger(__name__)

TAIYI_MAX_TEXT_LEN = 50
TEXT_BENIGN = ("bert.embeddings.position_ids",)
VISION_BENIGN = ("vision_model.embeddings.position_ids",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _need(directory, name: str, option: str) -> Path:
    p = Path(directory) / name
    if not p.is_file():
        raise ModelFilesError(
            f"{p}: missing; {option} must be a Hugging Face model directory "
            f"(download_assets.py --with-baselines fetches it)"
        )
    return p


def read_weights(path: str | os.PathLike) -> dict:
    """State dict of a ``.safetensors`` file or a weights-only torch file."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
    sd, _ = read_checkpoint(path)  # known wrappers (DataParallel's module. ...) unwrapped there
    return sd


def find_weights(directory, option: str) -> Path:
    for name in WEIGHT_FILES:
        p = Path(directory) / name
        if p.is_file():
            return p
    raise ModelFilesError(f"{directory}: no {' or '.join(WEIGHT_FILES)}; {option} must hold the model's weights")


def text_config(text_dir) -> BertConfig:
    return BertConfig.from_json_file(str(_need(text_dir, "config.json", "--taiyi-text-dir")))


def vision_config(clip_dir) -> CLIPVisionConfig:
    """The vision part of a CLIP ``config.json`` (new ``vision_config`` or old
    ``vision_config_dict`` layout) with the top-level ``projection_dim``."""
    path = _need(clip_dir, "config.json", "--clip-dir")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # also not UTF-8
        raise DataError(f"{path}: not valid JSON ({e})") from None
    vc = doc.get("vision_config") or doc.get("vision_config_dict") if isinstance(doc, dict) else None
    if not isinstance(vc, dict):
        raise DataError(f"{path}: no 'vision_config' (is this a CLIP model directory?)")
    vc = {k: v for k, v in vc.items() if k not in ("model_type", "transformers_version")}
    # CLIPModel's visual_projection follows the top-level projection_dim
    vc["projection_dim"] = doc.get("projection_dim", vc.get("projection_dim", 512))
    return CLIPVisionConfig(**vc)


def load_taiyi_tokenizer(text_dir) -> BertTokenizer:
    """The Taiyi tokenizer from the local directory (vocab.txt, plus tokenizer_config.json
    when present); nothing from a hub."""
    _need(text_dir, "vocab.txt", "--taiyi-text-dir")
    return BertTokenizer.from_pretrained(str(text_dir), local_files_only=True)


class TaiyiCLIP(nn.Module):
    """``text_model`` (BertForSequenceClassification) + ``image_model``
    (CLIPVisionModelWithProjection); the interface of ``models.align.AlignModel`` that
    the encoding helpers use (``encode_image``, ``encode_text``, ``image_model``)."""

    def __init__(self, text_cfg: BertConfig, vision_cfg: CLIPVisionConfig):
        super().__init__()
        if text_cfg.num_labels != vision_cfg.projection_dim:
            raise CheckpointError(
                f"the text encoder gives {text_cfg.num_labels} logits but the image "
                f"tower projects to {vision_cfg.projection_dim}: not a Taiyi-CLIP pair"
            )
        self.text_model = BertForSequenceClassification(text_cfg)
        self.image_model = CLIPVisionModelWithProjection(vision_cfg)
        self.embed_dim = vision_cfg.projection_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_model(pixel_values=images).image_embeds
        return F.normalize(x, p=2, dim=1) if normalize else x

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        x = self.text_model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.normalize(x, p=2, dim=1) if normalize else x


def load_text_state(model: TaiyiCLIP, path) -> list[str]:
    """Strictly load a Taiyi text-encoder state dict (``bert.*``, ``classifier.*``)."""
    return load_state(
        model.text_model,
        read_weights(path),
        str(path),
        benign=TEXT_BENIGN,
        hint="  (expected the state dict of the Taiyi-CLIP text encoder, a "
        "BertForSequenceClassification: keys bert.* and classifier.*)",
    )


def load_vision_state(model: TaiyiCLIP, path) -> list[str]:
    """Strictly load the image tower from a CLIPModel (or CLIPVisionModelWithProjection)
    state dict; the CLIP text tower in the same file is skipped and reported."""
    sd = read_weights(path)
    keep = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    skipped = len(sd) - len(keep)
    if skipped:
        log.info("%s: %d tensors of the CLIP text tower are not used", path, skipped)
    return load_state(
        model.image_model,
        keep,
        str(path),
        benign=VISION_BENIGN,
        hint="  (expected the weights of openai/clip-vit-base-patch32: vision_model.* and visual_projection.weight)",
    )


def _no_hf_init():
    """transformers' own switch for its models' ``_init_weights`` (which need not go
    through torch's init functions that ``skip_init`` silences)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def load_taiyi(text_dir, clip_dir, text_weights=None, device="cpu") -> TaiyiCLIP:
    """Taiyi-CLIP in eval mode from local directories; ``text_weights`` (the authors'
    fine-tuned ``pytorch_model.bin``) replaces the weights of ``text_dir``, which then
    need not be there."""
    with skip_init(), _no_hf_init():  # every weight is loaded next, strictly
        model = TaiyiCLIP(text_config(text_dir), vision_config(clip_dir))
    load_text_state(model, text_weights or find_weights(text_dir, "--taiyi-text-dir"))
    load_vision_state(model, find_weights(clip_dir, "--clip-dir"))
    return model.to(device).eval()
