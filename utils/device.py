"""``--device auto|cpu|cuda`` handling shared by every script."""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present. Asking for CUDA without a GPU is an error
    that says so, rather than a traceback from deep inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available on this machine "
                         f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda}); "
                         f"use --device cpu or auto")
    return torch.device(name)
