"""The authors' image preprocessing, written out as SPEC section 3 gives it, for the
benches' naive baselines: Pillow decode, ``cv2.resize`` on uint8, float64 normalisation.
(The package's own path gives the same bits with less work: utils/images.py.)"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def authors_image(path) -> torch.Tensor:
    """3 x 224 x 224 float32; the zero image (before normalisation) when unreadable."""
    try:
        img = np.array(Image.open(path).convert("RGB"))
    except Exception:  # noqa: BLE001  (the authors' scripts fell back to a blank image)
        img = np.zeros((224, 224, 3), dtype=np.uint8)
    img = (cv2.resize(img, (224, 224)) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.transpose(img, (2, 0, 1)).astype(np.float32))
