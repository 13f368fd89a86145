"""Taiyi-CLIP, the recall baseline: ``IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese`` (a BERT classifier whose
512 logits ARE the text vector) with the image tower of ``openai/clip-vit-base-patch32``. Local
directories only, built on the meta device, loaded strictly."""

from __future__ import annotations

from utils.cli import DataError

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from utils.io import read_json

from .bert import ModelFilesError, check_sizes, load_text_config, model_file
from .checkpoint import CheckpointError, load_state, read_checkpoint

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# transformers' buffers that no state dict holds, as its constructors compute them
COMPUTED_BUFFERS = {
    "position_ids": lambda b: torch.arange(b.shape[-1]).expand(b.shape),
    "token_type_ids": lambda b: torch.zeros(b.shape, dtype=b.dtype),
}
# in checkpoints of transformers versions that saved it (now computed): tolerated
TEXT_BENIGN, CLIP_BENIGN = ("bert.embeddings.position_ids",), ("vision_model.embeddings.position_ids",)
TEXT_EXPECTED = "  (expected the Taiyi-CLIP text encoder, a BertForSequenceClassification: bert.*, classifier.*)"
CLIP_EXPECTED = "  (expected the weights of openai/clip-vit-base-patch32: vision_model.*, visual_projection.weight)"
HF_DIR = "must be a Hugging Face model directory (download_assets.py --with-baselines fetches it)"
TEXT_HINT, CLIP_HINT = f"--taiyi-text-dir {HF_DIR}", f"--clip-dir {HF_DIR}"


def find_weights(directory, option: str) -> Path:
    for name in WEIGHT_FILES:
        p = Path(directory) / name
        if p.is_file():
            return p
    raise ModelFilesError(f"{directory}: no {' or '.join(WEIGHT_FILES)}; {option} must hold the model's weights")


def vision_config(clip_dir) -> transformers.CLIPVisionConfig:
    """The vision part of a CLIP ``config.json`` with the top-level ``projection_dim``."""
    path = model_file(clip_dir, "config.json", CLIP_HINT)
    doc = read_json(path)
    vc = doc.get("vision_config") or doc.get("vision_config_dict") if isinstance(doc, dict) else None
    if not isinstance(vc, dict):
        raise DataError(f"{path}: no 'vision_config' (is this a CLIP model directory?)")
    vc = {k: v for k, v in vc.items() if k not in ("model_type", "transformers_version")}
    vc["projection_dim"] = doc.get("projection_dim", vc.get("projection_dim", 512))  # what CLIPModel projects to
    cfg = transformers.CLIPVisionConfig(**vc)
    check_sizes(path, cfg)
    return cfg


def load_taiyi_tokenizer(text_dir) -> transformers.BertTokenizer:
    model_file(text_dir, "vocab.txt", TEXT_HINT)
    return transformers.BertTokenizer.from_pretrained(str(text_dir), local_files_only=True)


class TaiyiCLIP(nn.Module):
    """``text_model`` + ``image_model`` with ``AlignModel``'s ``encode_image`` and ``encode_text``."""

    def __init__(self, text_cfg: transformers.BertConfig, vision_cfg: transformers.CLIPVisionConfig):
        super().__init__()
        if text_cfg.num_labels != vision_cfg.projection_dim:
            dims = f"{text_cfg.num_labels} text logits, image vectors of {vision_cfg.projection_dim}"
            raise CheckpointError(f"not a Taiyi-CLIP pair: {dims}")
        self.text_model = transformers.BertForSequenceClassification(text_cfg)
        self.image_model = transformers.CLIPVisionModelWithProjection(vision_cfg)
        self.embed_dim = vision_cfg.projection_dim

    def encode_image(self, images, normalize: bool = True) -> torch.Tensor:
        x = self.image_model(pixel_values=images).image_embeds
        return F.normalize(x, p=2, dim=1) if normalize else x

    def encode_text(self, input_ids, attention_mask, normalize: bool = True) -> torch.Tensor:
        x = self.text_model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.normalize(x, p=2, dim=1) if normalize else x


def load_taiyi(text_dir, clip_dir, text_weights=None, device="cpu") -> TaiyiCLIP:
    """Taiyi-CLIP in eval mode; ``text_weights`` replaces those of ``text_dir`` (the authors' fine-tuned ones)."""
    text_cfg = load_text_config(text_dir, TEXT_HINT, transformers.BertConfig.from_json_file)
    with torch.device("meta"):  # built empty: load_state assigns the tensors
        model = TaiyiCLIP(text_cfg, vision_config(clip_dir))
    text_path = text_weights or find_weights(text_dir, "--taiyi-text-dir")
    load_state(model.text_model, read_checkpoint(text_path)[0], str(text_path), benign=TEXT_BENIGN, hint=TEXT_EXPECTED)
    clip_path = find_weights(clip_dir, "--clip-dir")
    sd, _ = read_checkpoint(clip_path)
    vision = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    if len(sd) > len(vision):
        log.info("%s: %d tensors of the CLIP text tower are not used", clip_path, len(sd) - len(vision))
    load_state(model.image_model, vision, str(clip_path), benign=CLIP_BENIGN, hint=CLIP_EXPECTED)
    for module in model.modules():  # the buffers still on meta, in no state dict: computed as transformers does
        for name, b in module.named_buffers(recurse=False):
            if b.is_meta:
                if name not in COMPUTED_BUFFERS:
                    raise RuntimeError(f"{type(module).__name__}.{name}: a buffer this loader cannot compute")
                module.register_buffer(name, COMPUTED_BUFFERS[name](b), persistent=False)
    return model.to(device).eval()
