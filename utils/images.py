"""Image preprocessing (SPEC section 3) and a Dataset over image paths.

``reference``: exactly the authors' path —
    PIL decode -> RGB uint8 -> cv2.resize(224 x 224, bilinear, on uint8, aspect not
    kept) -> (x / 255 - mean) / std -> 3 x 224 x 224 float32.
An unreadable file becomes the all-zero image before normalisation (as the authors'
scripts did), but here it is logged by path and flagged, never silent.

``fast``: the same, except that JPEG decoding uses Pillow's draft mode (DCT scaling
to the smallest size still >= 2 x 224 on each side), which skips most of the work
for multi-megapixel photos. Scores move slightly; see the README.
"""
from __future__ import annotations

import logging
import os
import warnings

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
PREPROCESS_MODES = ("reference", "fast")

# The recall set holds photos up to 61 MP; Pillow's bomb check would refuse them.
Image.MAX_IMAGE_PIXELS = 200_000_000
cv2.setNumThreads(1)  # decoding runs in DataLoader workers; avoid oversubscription


def decode_rgb(path: str | os.PathLike, mode: str = "reference") -> np.ndarray:
    """H x W x 3 uint8 RGB; raises on an unreadable file."""
    with Image.open(path) as im:
        if mode == "fast" and im.format == "JPEG":
            im.draft("RGB", (2 * SIZE, 2 * SIZE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(im.convert("RGB"))


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """Squash to 224 x 224 (OpenCV bilinear on uint8) and normalise: 3 x 224 x 224."""
    x = cv2.resize(rgb, (SIZE, SIZE))
    x = (x / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))


ZERO_TENSOR = to_tensor(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))


def load_image(path: str | os.PathLike, mode: str = "reference",
               transform=None) -> tuple[torch.Tensor, bool]:
    """``(tensor, ok)``; ``ok`` is False when the file could not be read, in which
    case the tensor is the zero image (the reference behaviour) and the path is logged.
    ``transform`` (a callable on the PIL image, for training augmentation) is applied
    before the resize, as in the authors' training."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; choose from {PREPROCESS_MODES}")
    try:
        rgb = decode_rgb(path, mode)
        if transform is not None:
            rgb = np.asarray(transform(Image.fromarray(rgb)).convert("RGB"))
        return to_tensor(rgb), True
    except Exception as e:  # any decode failure: missing, truncated, not an image
        log.warning("unreadable image %s (%s: %s); using the zero image", path, type(e).__name__, e)
        return ZERO_TENSOR.clone(), False


class ImageDataset(Dataset):
    """Preprocessed images for a ``DataLoader``: item ``i`` is ``(tensor, ok, i)``.

    ``loader`` (optional, picklable): another model's preprocessing, called as
    ``loader(path, mode) -> (tensor, ok)`` instead of :func:`load_image` (e.g.
    ``utils.clip_images.load_clip_image``)."""

    def __init__(self, paths, mode: str = "reference", transform=None, loader=None):
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocess mode {mode!r}; choose from {PREPROCESS_MODES}")
        self.paths = [str(p) for p in paths]
        self.mode = mode
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.loader is not None:
            x, ok = self.loader(self.paths[i], self.mode)
        else:
            x, ok = load_image(self.paths[i], self.mode, self.transform)
        return x, ok, i
