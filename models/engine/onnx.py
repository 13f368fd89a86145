"""The ONNX Runtime engine for the image tower (CPU, fp32), checked against torch to 1e-5 on every load. The
export is cached as ``<dir>/image_<key>.onnx`` (the argument, ``$AVAS_ONNX_CACHE``, ``~/.cache/avas/onnx``);
a cached file that fails is exported again, a fresh one refused (``image_encoder_for``: torch instead)."""

from __future__ import annotations

from utils.cli import UserError

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.args import BACKENDS
from utils.formats import SIZE
from utils.hashing import model_hash
from utils.io import atomic_path

from .encode import cpu_cores, default_lanes, eval_mode

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install onnxruntime onnx"
OPSET = 17
TOLERANCE = 1e-5  # max |diff| of the vectors from torch's
EXPORT_FORMAT = 1  # bump when the exported graph changes (inputs, outputs, wrapper)
AXES = ("images", "embedding", "features")


class OnnxBackendError(UserError, RuntimeError):
    """ONNX Runtime missing, or an export that fails or does not match torch."""


def require_onnxruntime():
    try:
        import onnxruntime
    except (ImportError, OSError) as e:  # not installed, or its native library will not load
        raise OnnxBackendError(f"the onnx backend needs onnxruntime ({e}); install it: {INSTALL_HINT}") from e
    return onnxruntime


def onnxruntime_available() -> bool:
    with contextlib.suppress(OnnxBackendError):
        return require_onnxruntime() is not None
    return False


class _ImageGraph(nn.Module):
    """What is exported: ``encode_image``, normalised and raw."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        feats = self.model.encode_image(x, normalize=False)
        return F.normalize(feats, p=2, dim=1), feats


def export_key(model, weights_hash: str, image_size: int) -> str:
    arch = getattr(model, "arch", None)
    ident = {
        "weights": weights_hash,
        "arch": dataclasses.asdict(arch) if dataclasses.is_dataclass(arch) else {"class": type(model).__name__},
        "class": type(model).__name__,
        "image_size": image_size,
        "torch": torch.__version__,
        "opset": OPSET,
        "format": EXPORT_FORMAT,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def export_image_graph(model, path: str | os.PathLike, image_size: int = SIZE) -> str:
    """Export ``model.encode_image`` to ``path`` (atomically); returns the exporter used."""
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
    except (ImportError, OSError) as e:
        raise OnnxBackendError(f"exporting the image tower needs the onnx package ({e}); {INSTALL_HINT}") from e
    x = torch.zeros(2, 3, image_size, image_size)
    names = {"input_names": ["images"], "output_names": ["embedding", "features"]}
    exporters = {  # TorchScript's, else dynamo's
        "torchscript": lambda: {"opset_version": OPSET, "dynamic_axes": {k: {0: "batch"} for k in AXES}},
        "dynamo": lambda: {"external_data": False, "dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}},
    }
    errors = []
    with atomic_path(path) as tmp, eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notes
        for exporter, options in exporters.items():
            try:
                torch.onnx.export(_ImageGraph(model), (x,), str(tmp), dynamo=exporter == "dynamo", **names, **options())
                return exporter
            except Exception as e:  # noqa: BLE001  (try the other exporter, then report both)
                errors.append(f"{exporter}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                with contextlib.suppress(OSError):
                    tmp.unlink()
        raise OnnxBackendError("ONNX export of the image tower failed: " + "; ".join(errors))


class OnnxImageEncoder:
    """``encode_image(x, normalize)`` of ``model`` on ONNX Runtime for ``lanes`` callers at once, each on
    ``threads`` intra-op threads (default: the cores shared); ``weights_hash``: a string or a function."""

    def __init__(self, model, cache_dir=None, weights_hash=None, threads=None, lanes=None):
        ort = require_onnxruntime()
        weights_hash = weights_hash() if callable(weights_hash) else weights_hash or model_hash(model)
        t = time.perf_counter()
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avas" / "onnx"
        directory = Path(cache_dir or os.environ.get("AVAS_ONNX_CACHE") or base)
        self.path = directory / f"image_{export_key(model, weights_hash, SIZE)}.onnx"
        self.lanes = lanes or default_lanes()
        self.opts = ort.SessionOptions()
        self.opts.intra_op_num_threads = threads or max(1, cpu_cores() // self.lanes)
        self.opts.inter_op_num_threads = 1
        self.opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads give the core back
        self.exported = not self.path.is_file()
        if self.exported:
            log.info("exported the image tower to %s (%s)", self.path, export_image_graph(model, self.path, SIZE))
        try:
            self.max_abs_diff = self._load(ort, model)
        except OnnxBackendError as e:
            if self.exported:
                raise
            log.warning("%s; exporting again", e)  # a damaged or stale cache file
            export_image_graph(model, self.path, SIZE)
            self.exported, self.max_abs_diff = True, self._load(ort, model)
        self.setup_seconds = time.perf_counter() - t
        log.info(
            f"onnx image encoder {self.path.name} ({'exported' if self.exported else 'cached export'}): max |diff| "
            f"vs torch {self.max_abs_diff:.1e}, {self.lanes} lanes x {self.opts.intra_op_num_threads} threads, "
            f"{self.setup_seconds:.1f} s"
        )

    def _load(self, ort, model) -> float:
        """Open the session; the max |diff| from torch on a random batch."""
        try:
            self.session = ort.InferenceSession(str(self.path), self.opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own types)
            raise OnnxBackendError(f"{self.path}: ONNX Runtime cannot load it ({e})") from e
        self.input_name = self.session.get_inputs()[0].name
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: far faster when other work shares the cores (README, Speed)
        try:
            with eval_mode(model), torch.inference_mode():
                ref = model.encode_image(x.to(next(model.parameters()).device)).float().cpu()
        finally:
            torch.set_num_threads(threads)
        diff = float((self.encode_image(x) - ref).abs().max())
        if not diff <= TOLERANCE:  # also catches NaN
            raise OnnxBackendError(
                f"{self.path}: ONNX Runtime vectors differ from torch by {diff:.2e} (> {TOLERANCE:g})"
            )
        return diff

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        emb, feats = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(emb if normalize else feats)

    __call__ = encode_image


def image_encoder_for(model, backend="auto", device="cpu", precision="fp32", cache_dir=None, weights_hash=None):
    """The ``f(x, normalize)`` of ``backend`` (``auto``: ONNX Runtime where it runs); a failed export: torch, warned."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "torch":
        return model.encode_image
    if torch.device(device).type != "cpu":
        why = f"the device is {torch.device(device).type}, ONNX Runtime runs on the CPU only"
    elif precision != "fp32":
        why = f"precision {precision}, ONNX Runtime runs fp32 only"
    else:
        why = None if onnxruntime_available() else "onnxruntime is not installed"
    if why and backend == "auto":
        log.info("image engine: torch (%s)", why)
        return model.encode_image
    if why:
        require_onnxruntime()  # the install hint, when that is why
        raise OnnxBackendError(f"--backend onnx cannot run here: {why}")
    try:
        enc = OnnxImageEncoder(model, cache_dir=cache_dir, weights_hash=weights_hash)
    except OnnxBackendError as e:
        log.warning("%s; falling back to the torch image encoder", e)
        return model.encode_image
    log.info("image engine: onnx (ONNX Runtime, max |diff| vs torch %.1e)", enc.max_abs_diff)
    return enc
