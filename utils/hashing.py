"""The one sha256 of a file and the one hash of a model's weights.

- ``sha256_file``: content hash of a file (asset pins, download manifests, the
  embedding cache's content keys).
- ``state_dict_hash`` / ``model_hash``: sha256 over key names, dtypes, shapes and
  values in sorted key order: equal for two models holding the same weights, whatever
  file they came from. Keys the embedding cache and the ONNX export cache.
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike, bufsize: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def state_dict_hash(sd: dict) -> str:
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def model_hash(model) -> str:
    """``state_dict_hash`` of ``model``'s weights."""
    return state_dict_hash(model.state_dict())
