"""Image preprocessing (SPEC section 3) and a Dataset over image paths.

``reference``, exactly the authors' path: PIL decode -> RGB uint8 -> cv2.resize to
224 x 224 (bilinear, on uint8, aspect not kept) -> (x / 255 - mean) / std -> 3 x 224 x 224
float32. An unreadable file becomes the all-zero image before normalisation, as in the
authors' scripts, but logged by path and flagged.

Same bits, less work: a YCbCr or grey JPEG is decoded by libjpeg-turbo (``simplejpeg``)
with Pillow's settings (accurate integer IDCT, fancy upsampling) in strict mode, into a
per-thread buffer (fresh multi-megabyte arrays per photo cost more than the decode on some
machines). Any failure or warning sends the file to Pillow, which decides as in the
reference; so do other images and files beyond Pillow's decompression-bomb bound, left as
the reference runs it. The normalisation is a lookup table of the same float64 expression.

``fast``: JPEGs decoded in Pillow's draft mode (DCT scaling to >= 2 x 224 a side): much
less work on large photos; scores move slightly. :func:`load_clip_image`: the
preprocessing of CLIP ViT-B/32 (the Taiyi-CLIP baseline).
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
    """Squash to 224 x 224 (OpenCV bilinear on uint8), normalise into ``out`` (3 x 224 x 224)."""
    x = cv2.resize(rgb, (SIZE, SIZE))
    for c in range(3):
        np.take(_LUT[c], x[..., c], out=out[c])


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """:func:`to_tensor_into` a new tensor."""
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
        _unreadable(path, e)
        out[...] = ZERO_TENSOR.numpy()
        return False


def _unreadable(path, e: Exception) -> None:
    log.warning("unreadable image %s (%s: %s); using the zero image", path, type(e).__name__, e)


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
    """Preprocessed images for a ``DataLoader``: item ``i`` is ``(tensor, ok, i)``; ``loader``
    (picklable, e.g. :func:`load_clip_image`) replaces :func:`load_image` as
    ``loader(path, mode) -> (tensor, ok)``."""

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


CLIP_SIZE = 224
_CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
_CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def clip_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 RGB -> 3 x 224 x 224 float32, as CLIP ViT-B/32 takes it: the short
    side resized to 224 (bicubic), the centre cropped, normalised."""
    h, w = rgb.shape[:2]
    long = int(CLIP_SIZE * max(w, h) / min(w, h))
    x = np.asarray(Image.fromarray(rgb).resize((CLIP_SIZE, long) if w <= h else (long, CLIP_SIZE), Image.BICUBIC))
    top, left = (x.shape[0] - CLIP_SIZE) // 2, (x.shape[1] - CLIP_SIZE) // 2
    x = x[top : top + CLIP_SIZE, left : left + CLIP_SIZE]
    x = ((x.astype(np.float64) * (1 / 255)).astype(np.float32) - _CLIP_MEAN) / _CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


CLIP_ZERO_TENSOR = clip_tensor(np.zeros((CLIP_SIZE, CLIP_SIZE, 3), dtype=np.uint8))


def load_clip_image(path: str | os.PathLike, mode: str = "reference") -> tuple[torch.Tensor, bool]:
    """``(tensor, ok)`` for ``ImageDataset(loader=...)``; the zero image when unreadable."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; choose from {PREPROCESS_MODES}")
    try:
        return clip_tensor(decode_rgb(path, mode)), True
    except Exception as e:  # any decode failure: missing, truncated, not an image
        _unreadable(path, e)
        return CLIP_ZERO_TENSOR.clone(), False
