"""Image preprocessing of OpenAI CLIP ViT-B/32 (the image tower of Taiyi-CLIP).

What ``CLIPImageProcessor`` of ``openai/clip-vit-base-patch32`` does, written out so
that it runs in DataLoader workers without transformers' processor machinery:

1. decode with PIL, ``convert("RGB")`` (greyscale replicated, alpha dropped);
2. resize so the SHORTEST side is 224, the long side ``int(224 * long / short)``,
   PIL bicubic on the uint8 image;
3. centre crop 224 x 224 (offsets ``(h - 224) // 2``, ``(w - 224) // 2``);
4. ``x * (1/255)`` in float64 -> float32, then ``(x - mean) / std`` in float32 with
   CLIP's mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258,
   0.27577711); 3 x 224 x 224.

The result equals the processor's ``pixel_values`` (tests/test_taiyi.py). One
deliberate difference: for images with transparency, transformers >= 5 composites
onto white, while the transformers 4 processors of the paper's time (and the
reference path of utils/images.py) simply drop the alpha channel; this module drops
it, as the authors' run did.

``mode="fast"`` decodes JPEGs with Pillow's draft mode (DCT scaling to the smallest
size still >= 448 on each side), as utils/images.py does for the recall model.
An unreadable file becomes the all-zero image before normalisation (logged, flagged).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image

from .images import PREPROCESS_MODES, decode_rgb

log = logging.getLogger(__name__)

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN32 = np.array(CLIP_MEAN, dtype=np.float32)
_STD32 = np.array(CLIP_STD, dtype=np.float32)


def resize_shortest(img: Image.Image, size: int = CLIP_SIZE) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), resample=Image.BICUBIC)


def center_crop(arr: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < size or w < size:  # cannot happen after resize_shortest; pad like transformers
        out = np.zeros((max(h, size), max(w, size), arr.shape[2]), dtype=arr.dtype)
        top, left = -(-(out.shape[0] - h) // 2), -(-(out.shape[1] - w) // 2)
        out[top:top + h, left:left + w] = arr
        arr, h, w = out, out.shape[0], out.shape[1]
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top:top + size, left:left + size]


def clip_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 RGB -> 3 x 224 x 224 float32, CLIP-normalised."""
    img = resize_shortest(Image.fromarray(rgb))
    x = center_crop(np.asarray(img))
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - _MEAN32) / _STD32
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


CLIP_ZERO_TENSOR = clip_tensor(np.zeros((CLIP_SIZE, CLIP_SIZE, 3), dtype=np.uint8))


def load_clip_image(path: str | os.PathLike, mode: str = "reference") -> tuple[torch.Tensor, bool]:
    """``(tensor, ok)`` for a DataLoader (``utils.images.ImageDataset(loader=...)``);
    ``ok`` False (and the zero image) when the file cannot be read."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; choose from {PREPROCESS_MODES}")
    try:
        return clip_tensor(decode_rgb(path, mode)), True
    except Exception as e:  # any decode failure: missing, truncated, not an image
        log.warning("unreadable image %s (%s: %s); using the zero image", path, type(e).__name__, e)
        return CLIP_ZERO_TENSOR.clone(), False
