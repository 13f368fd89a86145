"""Image preprocessing (SPEC section 3) and a Dataset over image paths.

``reference``: exactly the authors' path —
    PIL decode -> RGB uint8 -> cv2.resize(224 x 224, bilinear, on uint8, aspect not
    kept) -> (x / 255 - mean) / std -> 3 x 224 x 224 float32.
An unreadable file becomes the all-zero image before normalisation (as the authors'
scripts did), but here it is logged by path and flagged, never silent.

How it runs (same bits, less work): a baseline or progressive JPEG in YCbCr or grey is
decoded by libjpeg-turbo through ``simplejpeg`` with the settings Pillow uses (accurate
integer IDCT, fancy upsampling), into a per-thread buffer, and in strict mode: any
warning (truncated or corrupt data) sends the file to Pillow, which then decides as
in the reference (decode, or raise). Everything else (PNG, CMYK, oddly subsampled
JPEGs, or no simplejpeg) goes through Pillow. The normalisation is a per-channel
lookup table of the same float64 expression, cast to float32. tests/test_images.py
checks the bits against the plain Pillow path on JPEGs of every kind; allocating fresh
multi-megabyte arrays per photo (Pillow's RGBX image, then its copy) costs more than
the decode itself on some virtual machines.

``fast``: the same, except that JPEG decoding uses Pillow's draft mode (DCT scaling
to the smallest size still >= 2 x 224 on each side), which skips most of the work
for multi-megapixel photos. Scores move slightly; see the README.

``clip``: the preprocessing of OpenAI CLIP ViT-B/32 (the image tower of the Taiyi-CLIP
baseline), see :func:`load_clip_image`.
"""

from __future__ import annotations

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

try:  # libjpeg-turbo without Pillow's copies; optional (Pillow decodes otherwise)
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the install
    simplejpeg = None

log = logging.getLogger(__name__)

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
PREPROCESS_MODES = ("reference", "fast")
# (v / 255 - mean) / std in float64, as the reference computes it, for every uint8 v
_LUT = np.stack([(np.arange(256) / 255.0 - MEAN[c]) / STD[c] for c in range(3)]).astype(np.float32)

cv2.setNumThreads(1)  # decoding runs in worker processes or lanes; avoid oversubscription

_JPEG_MAGIC = b"\xff\xd8\xff"
_scratch = threading.local()
SCRATCH_MAX_BYTES = 64 << 20  # larger photos (up to 61 MP in the recall set) get a buffer of their own


def _pil_rgb(src, mode: str) -> np.ndarray:
    with Image.open(src) as im:
        if mode == "fast" and im.format == "JPEG":
            im.draft("RGB", (2 * SIZE, 2 * SIZE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(im.convert("RGB"))


def _turbo_rgb(data: bytes, scratch: bool) -> np.ndarray | None:
    """libjpeg-turbo's decode of a YCbCr / grey JPEG, or None: Pillow decides (whatever
    the fast decoder fails on, and images beyond Pillow's decompression-bomb bound, which
    is kept as the reference runs it)."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        limit = Image.MAX_IMAGE_PIXELS
        if colorspace not in ("YCbCr", "Gray") or (limit is not None and h * w > 2 * limit):
            return None
        buf = None
        if scratch and h * w * 3 <= SCRATCH_MAX_BYTES:
            buf = getattr(_scratch, "buf", None)
            if buf is None or buf.size < h * w * 3:
                buf = _scratch.buf = np.empty(h * w * 3, dtype=np.uint8)
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True, buffer=buf
        )
    except Exception:  # a warning in strict mode, a header it cannot classify (KeyError), ...
        return None


def decode_rgb(path: str | os.PathLike, mode: str = "reference", scratch: bool = False) -> np.ndarray:
    """H x W x 3 uint8 RGB; raises on an unreadable file. ``scratch``: the result may
    live in a buffer of this thread that the next call overwrites (for callers that
    resize it at once)."""
    if mode != "reference" or simplejpeg is None:
        return _pil_rgb(path, mode)
    with open(path, "rb") as f:
        data = f.read()
    rgb = _turbo_rgb(data, scratch) if data[:3] == _JPEG_MAGIC else None
    return rgb if rgb is not None else _pil_rgb(io.BytesIO(data), mode)


def reference_rgb(path: str | os.PathLike) -> np.ndarray:
    """The reference decode through Pillow only (what the fast path is checked against)."""
    return _pil_rgb(path, "reference")


def to_tensor_into(out: np.ndarray, rgb: np.ndarray) -> None:
    """Squash to 224 x 224 (OpenCV bilinear on uint8) and normalise into ``out`` (a
    3 x 224 x 224 float32 array)."""
    x = cv2.resize(rgb, (SIZE, SIZE))
    for c in range(3):
        np.take(_LUT[c], x[..., c], out=out[c])


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """Squash to 224 x 224 (OpenCV bilinear on uint8) and normalise: 3 x 224 x 224."""
    out = np.empty((3, SIZE, SIZE), dtype=np.float32)
    to_tensor_into(out, rgb)
    return torch.from_numpy(out)


ZERO_TENSOR = to_tensor(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))


def load_image_into(out: np.ndarray, path: str | os.PathLike, mode: str = "reference", transform=None) -> bool:
    """:func:`load_image` written into ``out`` (3 x 224 x 224 float32, e.g. a row of a
    batch array); returns ``ok``."""
    try:
        rgb = decode_rgb(path, mode, scratch=transform is None)
        if transform is not None:
            rgb = np.asarray(transform(Image.fromarray(rgb)).convert("RGB"))
        to_tensor_into(out, rgb)
        return True
    except Exception as e:  # any decode failure: missing, truncated, not an image
        log.warning("unreadable image %s (%s: %s); using the zero image", path, type(e).__name__, e)
        out[...] = ZERO_TENSOR.numpy()
        return False


def load_image(path: str | os.PathLike, mode: str = "reference", transform=None) -> tuple[torch.Tensor, bool]:
    """``(tensor, ok)``; ``ok`` is False when the file could not be read, in which
    case the tensor is the zero image (the reference behaviour) and the path is logged.
    ``transform`` (a callable on the PIL image, for training augmentation) is applied
    before the resize, as in the authors' training."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; choose from {PREPROCESS_MODES}")
    out = np.empty((3, SIZE, SIZE), dtype=np.float32)
    ok = load_image_into(out, path, mode, transform)
    return torch.from_numpy(out), ok


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


# ---------------------------------------------------------------------------
# CLIP ViT-B/32 preprocessing (the Taiyi-CLIP baseline's image tower)
# ---------------------------------------------------------------------------
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
        out[top : top + h, left : left + w] = arr
        arr, h, w = out, out.shape[0], out.shape[1]
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top : top + size, left : left + size]


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
