"""Image preprocessing (SPEC section 3): Pillow decode -> RGB -> cv2.resize to 224 x 224 ->
(x / 255 - mean) / std. YCbCr and grey JPEGs decode through libjpeg-turbo to the same bits,
falling back to Pillow on any failure; an unreadable file is the zero image, logged."""

from __future__ import annotations

import functools
import io
import logging
import os
import threading
import warnings

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..args import PREPROCESS_MODES

try:  # libjpeg-turbo without Pillow's copies; optional (Pillow decodes otherwise)
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the install
    simplejpeg = None

log = logging.getLogger(__name__)

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# (v / 255 - mean) / std in float64, as the reference computes it, for every uint8 v
_LUT = np.stack([(np.arange(256) / 255.0 - MEAN[c]) / STD[c] for c in range(3)]).astype(np.float32)

cv2.setNumThreads(1)  # decoding runs in worker processes or lanes; avoid oversubscription

# a fresh multi-megabyte array per photo costs more than the decode on some machines
_scratch = threading.local()
SCRATCH_MAX_BYTES = 64 << 20  # larger photos (up to 61 MP in the recall set) get a buffer of their own


def reference_rgb(src, mode: str = "reference") -> np.ndarray:
    """Pillow's decode, the reference (``fast``: JPEGs in draft mode, >= 2 x 224 a side)."""
    with Image.open(src) as im:
        if mode == "fast" and im.format == "JPEG":
            im.draft("RGB", (2 * SIZE, 2 * SIZE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(im.convert("RGB"))


def _turbo_rgb(data: bytes, scratch: bool) -> np.ndarray | None:
    """libjpeg-turbo's decode of a JPEG, or None when Pillow should decide."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        limit = Image.MAX_IMAGE_PIXELS  # Pillow refuses above twice its limit
        if colorspace not in ("YCbCr", "Gray") or (limit is not None and h * w > 2 * limit):
            return None
        buf = None
        if scratch and h * w * 3 <= SCRATCH_MAX_BYTES:
            buf = getattr(_scratch, "buf", None)
            if buf is None or buf.size < h * w * 3:
                buf = _scratch.buf = np.empty(h * w * 3, dtype=np.uint8)
        # Pillow's settings (accurate integer IDCT, fancy upsampling); strict: a warning fails
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True, buffer=buf
        )
    except Exception:  # a warning in strict mode, a header it cannot classify (KeyError), ...
        return None


def decode_rgb(path: str | os.PathLike, mode: str = "reference", scratch: bool = False) -> np.ndarray:
    """H x W x 3 uint8 RGB; raises on an unreadable file. ``scratch``: the result may live in a
    buffer of this thread that the next call overwrites (for callers that resize at once)."""
    if mode != "reference" or simplejpeg is None:
        return reference_rgb(path, mode)
    with open(path, "rb") as f:
        data = f.read()
    rgb = _turbo_rgb(data, scratch) if data.startswith(b"\xff\xd8\xff") else None  # a JPEG's magic
    return rgb if rgb is not None else reference_rgb(io.BytesIO(data))


def to_tensor(rgb: np.ndarray, out: np.ndarray | None = None) -> torch.Tensor:
    """Squash to 224 x 224 (OpenCV bilinear on uint8) and normalise, into ``out`` when given."""
    out = np.empty((3, SIZE, SIZE), dtype=np.float32) if out is None else out
    x = cv2.resize(rgb, (SIZE, SIZE))
    for c in range(3):
        np.take(_LUT[c], x[..., c], out=out[c])
    return torch.from_numpy(out)


ZERO_TENSOR = to_tensor(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))


def load_image(path: str | os.PathLike, mode: str = "reference", transform=None, make=to_tensor):
    """``(make(rgb), ok)``, ``make`` of a black image when unreadable; ``transform`` augments the decode."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; choose from {PREPROCESS_MODES}")
    try:
        rgb = decode_rgb(path, mode, scratch=transform is None)
        if transform is not None:
            rgb = np.asarray(transform(Image.fromarray(rgb)).convert("RGB"))
        return make(rgb), True
    except Exception as e:  # any decode failure: missing, truncated, not an image
        log.warning("unreadable image %s (%s: %s); using the zero image", path, type(e).__name__, e)
        return make(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)), False


def load_image_into(out: np.ndarray, path: str | os.PathLike, mode: str = "reference") -> bool:
    """:func:`load_image` written into ``out`` (e.g. a row of a batch array); returns ``ok``."""
    return load_image(path, mode, make=functools.partial(to_tensor, out=out))[1]


class ImageDataset(Dataset):
    """Item ``i`` is ``(tensor, ok, i)``; a picklable ``loader(path, mode)`` may replace :func:`load_image`."""

    def __init__(self, paths, mode: str = "reference", transform=None, loader=None):
        self.paths, self.mode = [str(p) for p in paths], mode
        self.loader = loader or functools.partial(load_image, transform=transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return (*self.loader(self.paths[i], self.mode), i)


_CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
_CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def clip_tensor(rgb: np.ndarray) -> torch.Tensor:
    """CLIP ViT-B/32's input (the Taiyi baseline): short side to 224 (bicubic), centre crop."""
    h, w = rgb.shape[:2]
    long = int(SIZE * max(w, h) / min(w, h))
    x = np.asarray(Image.fromarray(rgb).resize((SIZE, long) if w <= h else (long, SIZE), Image.BICUBIC))
    top, left = (x.shape[0] - SIZE) // 2, (x.shape[1] - SIZE) // 2
    x = x[top : top + SIZE, left : left + SIZE]
    x = ((x.astype(np.float64) * (1 / 255)).astype(np.float32) - _CLIP_MEAN) / _CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


load_clip_image = functools.partial(load_image, make=clip_tensor)  # picklable, for ImageDataset(loader=...)
