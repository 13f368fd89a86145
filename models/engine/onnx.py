"""The ONNX Runtime engine for the image tower: the same vectors as torch (checked to
1e-5 on every load), several times the images/s of torch on a CPU.

    enc = OnnxImageEncoder(model, weights_hash=model_hash(model))   # export once, cached
    emb = enc.encode_image(x)                   # N x D normalised, like model.encode_image(x)
    raw = enc(x, normalize=False)               # the image_hidden_layer output

    image_encoder_for(model, "auto", device)    # what models.factory.RecallModel uses

What is exported: ``model.encode_image`` (align: ``image_model`` -> ``image_hidden_layer``
-> L2 normalisation) as one graph with a dynamic batch dimension and two outputs, the
normalised vectors (``embedding``) and the raw ones (``features``). The exporter is
torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)`` (one self-contained
file, no extra package); the dynamo exporter (needs ``onnxscript``) is tried only if that
one fails. ``torch.onnx`` and ``onnx`` are imported only when a graph is exported.

Cache: ``<dir>/image_<key>.onnx``, ``key`` = sha256 of the weights hash (the model's
``utils.hashing.model_hash``, the one the embedding cache uses, passed in so that it is
computed once per run), the model's architecture, the input size, the torch version and
the exporter; the file is written atomically, so parallel runs are safe. ``dir`` = the
``cache_dir`` argument, else ``$AVAS_ONNX_CACHE``, else ``$XDG_CACHE_HOME/avas/onnx``
(``~/.cache/avas/onnx``). A valid cached file is loaded, never exported again.

Exactness: every time a session is created the graph is run beside torch on a random
batch; a cached file that cannot be loaded or differs by more than ``tolerance`` (1e-5)
is exported again; a fresh export that still differs raises ``OnnxBackendError``, and
``image_encoder_for`` then warns and falls back to torch. Runs on the CPU only
(``CPUExecutionProvider``), fp32 only.

Threads: the encoder is made for ``lanes`` callers at once (default
``utils.embed.default_lanes()``: one per core), each run on ``threads`` intra-op threads
(default: the cores shared among the lanes, so 1), with spinning off;
``utils.embed.encode_images`` runs that many lanes, each decoding a batch and encoding it
(see the notes there and bench/bench_recall.py --split for the measurement).
``lanes=1`` gives one caller every core.

Memory: ONNX Runtime's CPU memory arena keeps its largest activation buffers between
batches; ``mem_arena=False`` gives them back at some cost in images/s.
"""

from __future__ import annotations

from utils.cli import UserError

import contextlib
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

from utils.hashing import model_hash

from .encode import cpu_cores, default_lanes, eval_mode

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
INSTALL_HINT = "pip install onnxruntime onnx"
OPSET = 17
EXPORT_FORMAT = 1  # bump when the exported graph changes (inputs, outputs, wrapper)


class OnnxBackendError(UserError, RuntimeError):
    """ONNX Runtime missing, or an export that fails or does not match torch."""


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported (and works far enough to import)."""
    try:
        require_onnxruntime()
    except OnnxBackendError:
        return False
    return True


def require_onnxruntime():
    """The ``onnxruntime`` module, or an error that says how to install it."""
    try:
        import onnxruntime
    except (ImportError, OSError) as e:  # not installed, or its native library will not load
        raise OnnxBackendError(f"the onnx backend needs onnxruntime ({e}); install it: {INSTALL_HINT}") from e
    return onnxruntime


def _require_exporter() -> None:
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
    except (ImportError, OSError) as e:
        raise OnnxBackendError(
            f"exporting the image tower to ONNX needs the onnx package ({e}); install it: {INSTALL_HINT}"
        ) from e


def default_cache_dir() -> Path:
    if os.environ.get("AVAS_ONNX_CACHE"):
        return Path(os.environ["AVAS_ONNX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "avas" / "onnx"


class _ImageGraph(nn.Module):
    """What is exported: ``encode_image`` with both the normalised and raw outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        feats = self.model.encode_image(x, normalize=False)
        return F.normalize(feats, p=2, dim=1), feats


def _arch_of(model) -> dict:
    arch = getattr(model, "arch", None)
    if arch is not None and hasattr(arch, "to_dict"):
        return arch.to_dict()
    return {"class": type(model).__name__}


def export_key(model, weights_hash: str, image_size: int) -> str:
    ident = {
        "weights": weights_hash,
        "arch": _arch_of(model),
        "class": type(model).__name__,
        "image_size": image_size,
        "torch": torch.__version__,
        "opset": OPSET,
        "format": EXPORT_FORMAT,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def export_image_graph(model, path: str | os.PathLike, image_size: int = 224) -> str:
    """Export ``model.encode_image`` to ``path`` (atomically); returns the exporter used."""
    _require_exporter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    graph = _ImageGraph(model)
    x = torch.zeros(2, 3, image_size, image_size)
    names = dict(input_names=["images"], output_names=["embedding", "features"])
    errors = []
    with eval_mode(model), torch.no_grad():
        for exporter in ("torchscript", "dynamo"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the legacy exporter's deprecation notes
                    if exporter == "torchscript":
                        torch.onnx.export(
                            graph,
                            (x,),
                            str(tmp),
                            dynamo=False,
                            opset_version=OPSET,
                            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}, "features": {0: "batch"}},
                            **names,
                        )
                    else:
                        torch.onnx.export(
                            graph,
                            (x,),
                            str(tmp),
                            dynamo=True,
                            external_data=False,
                            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                            **names,
                        )
                break
            except Exception as e:  # noqa: BLE001  (try the other exporter, then report both)
                errors.append(f"{exporter}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                with contextlib.suppress(OSError):
                    tmp.unlink()
        else:
            raise OnnxBackendError("ONNX export of the image tower failed: " + "; ".join(errors))
    os.replace(tmp, path)
    return exporter


class OnnxImageEncoder:
    """``encode_image(x, normalize=True)`` of ``model`` run by ONNX Runtime.

    ``weights_hash``: the model's ``model_hash`` if already known (else computed).
    ``lanes``: how many callers it serves at once (default :func:`utils.embed.default_lanes`);
    ``threads``: intra-op threads of each call (default: the cores over the lanes, at least 1);
    ``spin``: whether idle engine threads spin (default off, see the module notes).
    ``exported``: whether this instance exported the graph (False = cache hit);
    ``max_abs_diff``: the deviation from torch measured when it was loaded;
    ``setup_seconds``: export (if any), load and check.
    """

    def __init__(
        self,
        model,
        cache_dir=None,
        weights_hash: str | None = None,
        threads: int | None = None,
        lanes: int | None = None,
        image_size: int = 224,
        tolerance: float = 1e-5,
        verify_batch: int = 2,
        mem_arena: bool = True,
        spin: bool = False,
    ):
        ort = require_onnxruntime()
        if callable(weights_hash):  # computed only now that it is needed
            weights_hash = weights_hash()
        if weights_hash is None:
            weights_hash = model_hash(model)
        self.image_size = image_size
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.path = self.dir / f"image_{export_key(model, weights_hash, image_size)}.onnx"
        self.exported = False
        t = time.perf_counter()
        if not self.path.is_file():
            exporter = export_image_graph(model, self.path, image_size)
            self.exported = True
            log.info(
                "exported the image tower to %s (%s exporter, %.1f s)", self.path, exporter, time.perf_counter() - t
            )
        self.opts = ort.SessionOptions()
        self.lanes = lanes or default_lanes()
        self.opts.intra_op_num_threads = threads or max(1, cpu_cores() // self.lanes)
        self.opts.inter_op_num_threads = 1
        self.opts.enable_cpu_mem_arena = mem_arena
        self.opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self._load(ort)
            self.max_abs_diff = self.verify(model, verify_batch, tolerance)
        except OnnxBackendError as e:
            if self.exported:
                raise
            # a damaged or stale cache file: export again, once
            log.warning("%s; exporting again", e)
            export_image_graph(model, self.path, image_size)
            self.exported = True
            self._load(ort)
            self.max_abs_diff = self.verify(model, verify_batch, tolerance)
        self.setup_seconds = time.perf_counter() - t
        log.info(
            "onnx image encoder %s (%s): max |diff| vs torch %.1e, %d lanes x %d threads, %.1f s",
            self.path.name,
            "exported" if self.exported else "cached export",
            self.max_abs_diff,
            self.lanes,
            self.opts.intra_op_num_threads,
            self.setup_seconds,
        )

    def _load(self, ort) -> None:
        try:
            self.session = ort.InferenceSession(str(self.path), self.opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own types)
            raise OnnxBackendError(f"{self.path}: ONNX Runtime cannot load it ({e})") from e
        self.input_name = self.session.get_inputs()[0].name

    def verify(self, model, batch: int, tolerance: float) -> float:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, self.image_size, self.image_size, generator=g)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # decoders run beside it at start-up: one thread waits on no other
        try:
            with eval_mode(model), torch.inference_mode():
                ref = model.encode_image(x.to(next(model.parameters()).device), normalize=True).float().cpu()
        finally:
            torch.set_num_threads(threads)
        got = self.encode_image(x)
        diff = float((got - ref).abs().max())
        if not diff <= tolerance:  # also catches NaN
            raise OnnxBackendError(
                f"{self.path}: ONNX Runtime vectors differ from torch by {diff:.2e} "
                f"(> {tolerance:g}) on a random batch; not using this export"
            )
        return diff

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        emb, feats = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(emb if normalize else feats)

    __call__ = encode_image


def image_encoder_for(
    model, backend: str = "auto", device="cpu", precision: str = "fp32", cache_dir=None, weights_hash=None
):
    """The ``f(x, normalize)`` that encodes image batches with the engine ``backend``.

    ``torch``: ``model.encode_image``. ``onnx``: an :class:`OnnxImageEncoder`; it needs the
    CPU, fp32 and onnxruntime (each a clear ``OnnxBackendError``); an export that fails or
    does not match torch is reported in a warning and torch is used instead. ``auto``:
    ONNX Runtime when the device is a CPU, the precision fp32 and onnxruntime importable,
    under the same agreement check; torch otherwise (CUDA, bf16/fp16, no onnxruntime). The
    choice is logged. ``weights_hash``: the model's hash, or a function giving it (called
    only when ONNX Runtime is used), or None (computed when needed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "torch":
        return model.encode_image
    device = torch.device(device)
    if backend == "auto":
        why = (
            "the device is " + device.type
            if device.type != "cpu"
            else f"precision {precision} (ONNX Runtime runs fp32)"
            if precision != "fp32"
            else "onnxruntime is not installed"
            if not onnxruntime_available()
            else None
        )
        if why:
            log.info("image engine: torch (%s)", why)
            return model.encode_image
    else:
        if device.type != "cpu":
            raise OnnxBackendError(
                f"--backend onnx runs on the CPU only (device {device}); use --backend torch or auto on a GPU"
            )
        if precision != "fp32":
            raise OnnxBackendError(f"--backend onnx is fp32 only (precision {precision})")
        require_onnxruntime()
    try:
        enc = OnnxImageEncoder(model, cache_dir=cache_dir, weights_hash=weights_hash)
    except OnnxBackendError as e:
        log.warning("%s; falling back to the torch image encoder", e)
        return model.encode_image
    log.info("image engine: onnx (ONNX Runtime, max |diff| vs torch %.1e)", enc.max_abs_diff)
    return enc
