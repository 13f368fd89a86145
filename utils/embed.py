"""Batched encoding of images and texts with an alignment-style model, shared by the
recall, ranking and selection scripts.

    emb, ok = encode_images(model, paths, batch_size=None, device="cpu")   # N x D, N bools
    txt = encode_texts(model, tokenizer, texts, batch_size=64, device="cpu")  # len(texts) x D

``model`` needs ``encode_image(x, normalize=False)`` (and ``image_model`` for the memory
format) and ``encode_text(input_ids, attention_mask, normalize=False)``; both returned
tensors are float32, L2-normalised, on the CPU, row i for input i.

Speed (figures: bench/bench_recall.py and the README): images are decoded and
preprocessed in DataLoader worker processes while the engine encodes the previous batch;
the torch engine runs the image tower in ``channels_last`` under ``torch.inference_mode``
(ONNX Runtime, utils/onnx_backend.py, takes plain NCHW); ``precision="bf16"``/``"fp16"``
adds autocast, which is faster only with native support (GPU, AVX-512 BF16 / AMX CPUs;
emulated, far slower, on AVX2-only CPUs: a warning says so) and moves scores, so fp32 is
the default. Each distinct text is encoded once, in batches of similar length.

Start-up overlap (``prefetch_images``): a script that knows its image paths before its
model is loaded starts the decoding workers right after reading its input, so decoding
runs while the model loads; ``encode_images(..., prefetch=source)`` then consumes the
batches already decoded. The batches are the ones ``encode_images`` would make itself
(same paths, order, batch size and preprocessing), so the vectors are identical; a
source that does not match the call (other paths, a cache that serves some of them) is
closed unused and the images are decoded as usual.

The model is switched to eval mode for the call and back afterwards, and its image
tower is left in ``channels_last`` (same values, faster; harmless for training).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .images import ImageDataset

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
MAX_TEXT_LEN = 50  # tokens (SPEC 2)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_batch_size(device) -> int:
    """32 on CPU (larger batches are no faster for B3 at 224 px and cost memory), 128 on
    CUDA."""
    return 128 if torch.device(device).type == "cuda" else 32


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# How the cores are shared on a CPU, engine threads vs decoding workers. Decoding and
# resizing a 2 MP photo costs a small fraction of the CPU time of encoding it, even with
# ONNX Runtime, so the engine gets every core and one worker per DECODE_SHARE cores
# (at least one) decodes ahead; the engine's threads do not spin while idle, so a worker
# that wakes up finds a core. Measured split: bench/bench_recall.py --split.
DECODE_SHARE = {"onnx": 4, "torch": 2}
MAX_WORKERS = 8


def default_num_workers(device, backend: str = "torch") -> int:
    """Decoding worker processes for the engine ``backend`` (``"torch"``/``"onnx"``, the
    one that actually runs). On CPU one per ``DECODE_SHARE[backend]`` cores, at least 1,
    at most 8; on CUDA (the GPU encodes, the cores only decode) every core up to 8."""
    n = cpu_cores()
    if torch.device(device).type == "cuda":
        return max(1, min(n, MAX_WORKERS))
    return max(1, min(n // DECODE_SHARE.get(backend, 2), MAX_WORKERS))


def default_engine_threads() -> int:
    """Intra-op threads of the CPU engine: every core (torch's own default, too)."""
    return max(1, cpu_cores())


def native_low_precision(device, precision: str) -> bool:
    """False when ``precision`` would be emulated: on a CPU without AVX-512 BF16 / AMX
    (where it is emulated, bf16 convolutions run far slower than fp32)."""
    if precision == "fp32" or torch.device(device).type != "cpu":
        return True
    cpu = torch.cpu
    try:
        if precision == "bf16":
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        return bool(cpu._is_amx_fp16_supported())
    except AttributeError:  # private helpers of this torch build; assume it is fine
        return True


def autocast(device, precision: str):
    """Context manager for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block, its previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def tokenize(tokenizer, texts: list[str], max_length: int = MAX_TEXT_LEN) -> dict:
    """Pad to the longest text of the batch, truncate at ``max_length`` (SPEC 2)."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _worker_init(_):
    torch.set_num_threads(1)


# Images decoded ahead by a prefetch source: its queue bound (~0.6 MB per image), the same
# as encode_images' own queue at the CPU defaults (4 batches of 32 for one worker), so
# memory is as without it. Deeper is slower on 2 cores: the worker then keeps decoding
# through the engine's set-up (ONNX session + agreement check, multi-threaded), which
# it slows by more than it gains (bench/bench_recall.py).
PREFETCH_IMAGES = 128


def _loader(paths: list[str], mode: str, image_loader, batch_size: int, num_workers: int,
            device: torch.device, prefetch_factor: int = 4) -> DataLoader:
    return DataLoader(ImageDataset(paths, mode, loader=image_loader), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda",
                      worker_init_fn=_worker_init if num_workers else None,
                      prefetch_factor=prefetch_factor if num_workers else None,
                      persistent_workers=False)


class ImagePrefetch:
    """Decoding of ``paths`` started now, in DataLoader worker processes that fill a
    bounded queue (at most ``depth`` images, default ``PREFETCH_IMAGES``) while the caller
    does something else (loads the model); ``encode_images(..., prefetch=self)`` consumes
    it. Made by :func:`prefetch_images`. ``close()`` (or ``with``) stops the workers of a
    source that is not consumed; one that is consumed is closed by ``encode_images``.
    With ``num_workers=0`` nothing runs ahead (decoding happens when consumed)."""

    def __init__(self, paths, batch_size: int | None = None, device="cpu", mode: str = "reference",
                 num_workers: int | None = None, image_loader=None, backend: str = "onnx",
                 depth: int = PREFETCH_IMAGES):
        self.device = torch.device(device)
        self.paths = [str(p) for p in paths]
        self.batch_size = batch_size or default_batch_size(self.device)
        self.mode, self.image_loader = mode, image_loader
        self.num_workers = default_num_workers(self.device, backend) if num_workers is None else num_workers
        factor = max(2, -(-depth // (self.batch_size * max(self.num_workers, 1))))
        self._it = iter(_loader(self.paths, mode, image_loader, self.batch_size, self.num_workers,
                                self.device, factor)) if self.paths else None

    def matches(self, paths: list[str], batch_size: int, mode: str, image_loader) -> bool:
        """True when consuming this source gives exactly the batches of these arguments."""
        return (self._it is not None and paths == self.paths and batch_size == self.batch_size
                and mode == self.mode and image_loader is self.image_loader)

    def take(self):
        """The batch iterator (once); the source is empty afterwards."""
        it, self._it = self._it, None
        return it

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:  # workers stopped now rather than when collected
            shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prefetch_images(paths, batch_size: int | None = None, device="cpu", mode: str = "reference",
                    num_workers: int | None = None, image_loader=None, backend: str = "auto",
                    precision: str = "fp32") -> ImagePrefetch:
    """Start decoding ``paths`` now (see :class:`ImagePrefetch`), for a later
    ``encode_images(model, paths, batch_size, device, mode=mode, num_workers=num_workers,
    prefetch=source)`` without a cache. ``backend``/``precision`` (the requested engine)
    only pick the default worker count before the engine is known: ONNX Runtime's when
    ``auto`` would choose it (CPU, fp32), else torch's."""
    dev = torch.device(device)
    likely = "onnx" if backend in ("auto", "onnx") and dev.type == "cpu" and precision == "fp32" else "torch"
    return ImagePrefetch(paths, batch_size, dev, mode, num_workers, image_loader, likely)


def encode_images(model, paths: Sequence[str | os.PathLike], batch_size: int | None = None,
                  device="cpu", mode: str = "reference", num_workers: int | None = None,
                  precision: str = "fp32", cache=None, stats: dict | None = None,
                  progress: bool = True, desc: str = "images",
                  image_loader=None, image_encoder=None,
                  engine=None, prefetch: ImagePrefetch | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode image files: returns ``(emb, ok)``, ``emb`` N x D float32 (normalised,
    CPU), ``ok`` a bool tensor, False where the file was missing or unreadable (its row
    is the embedding of the zero image, SPEC 3 step 4; callers decide to keep or drop it).

    ``mode``: preprocessing, ``"reference"`` or ``"fast"`` (utils.images).
    ``image_loader``: another model's preprocessing ``f(path, mode) -> (tensor, ok)``
    (picklable; default ``utils.images.load_image``); see ``models.factory``.
    ``batch_size`` / ``num_workers``: None picks the device default.
    ``cache``: a ``utils.cache.EmbeddingCache``; hits are not decoded or encoded, and
    new vectors are stored batch by batch. Files with identical content are encoded once.
    ``image_encoder``: the ``f(x, normalize)`` that runs the image tower (default
    ``model.encode_image``; ``utils.onnx_backend.image_encoder_for`` builds the ONNX
    Runtime one). ``engine``: instead, a function returning it, called only when some
    image is not in the cache (so an all-cached run sets up no engine).
    ``prefetch``: an :class:`ImagePrefetch` started on these paths (``prefetch_images``);
    its batches are used when they are exactly the ones this call would decode (no
    cache hit, same paths, batch size, preprocessing), else it is closed unused; either
    way it is closed on return.
    ``stats``: if a dict is given it receives ``total``, ``encoded`` (images run through
    the model), ``cached`` (taken from the cache), ``unreadable``, ``seconds``,
    ``num_workers`` and ``first_batch_at`` (``time.perf_counter()`` when the first batch
    was encoded, None if none was: what start-up time is measured to).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    batch_size = batch_size or default_batch_size(device)
    paths = [str(p) for p in paths]
    n = len(paths)
    ns = cache.namespace(mode, precision) if cache is not None else None
    if not native_low_precision(device, precision):
        log.warning("precision %s on this CPU (%s) has no native support and is emulated: expect it "
                    "to be far slower than fp32", precision, torch.backends.cpu.get_cpu_capability())

    vectors: list[np.ndarray | None] = [None] * n
    ok = np.ones(n, dtype=bool)
    keys: list[str | None] = [None] * n
    if cache is not None and n:
        keys = cache.content_keys(paths)
        found = cache.get_many(keys, ns)
        for i, k in enumerate(keys):
            if k in found:
                vectors[i], ok[i] = found[k]
    # what still needs the model: one path per distinct content (or per path without a key)
    todo: list[int] = []
    first_of: dict[str, int] = {}
    for i in range(n):
        if vectors[i] is not None:
            continue
        k = keys[i]
        if k is not None and k in first_of:
            continue
        if k is not None:
            first_of[k] = i
        todo.append(i)
    n_cached = sum(v is not None for v in vectors)
    first_batch_at = None

    try:
        if todo:
            batches = None
            if prefetch is not None and len(todo) == n and (
                    num_workers is None or num_workers == prefetch.num_workers) and prefetch.matches(
                    paths, batch_size, mode, image_loader):
                num_workers, batches = prefetch.num_workers, prefetch.take()
                log.debug("images: consuming the %d images decoded ahead", n)
            elif prefetch is not None:
                log.debug("images: prefetched batches do not match this call; decoding anew")
                prefetch.close()
            if image_encoder is None:
                image_encoder = engine() if engine is not None else model.encode_image
            on_torch = getattr(image_encoder, "__self__", None) is model
            if batches is None:
                if num_workers is None:
                    num_workers = default_num_workers(device, "torch" if on_torch else "onnx")
                batches = _loader([paths[i] for i in todo], mode, image_loader, batch_size,
                                  num_workers, device)
            first_batch_at = _encode_batches(model, batches, todo, keys, vectors, ok, cache, ns,
                                             image_encoder, on_torch, device, precision,
                                             progress, desc)
    finally:
        if prefetch is not None:
            prefetch.close()
    # duplicates of encoded content
    for i in range(n):
        if vectors[i] is None:
            j = first_of[keys[i]]
            vectors[i], ok[i] = vectors[j], ok[j]

    dim = getattr(getattr(model, "arch", None), "embed_dim", None)
    emb = torch.from_numpy(np.stack(vectors).astype(np.float32, copy=False)) if n else \
        torch.empty(0, dim or 0)
    result = {"total": n, "encoded": len(todo), "cached": n_cached,
              "unreadable": int((~ok).sum()), "seconds": time.perf_counter() - t0,
              "num_workers": num_workers if todo else 0, "first_batch_at": first_batch_at}
    if stats is not None:
        stats.update(result)
    log.info("images: %d total, %d encoded, %d from cache, %d unreadable, %.1f s (%.1f img/s encoded)",
             n, len(todo), n_cached, result["unreadable"], result["seconds"],
             len(todo) / max(result["seconds"], 1e-9))
    return emb, torch.from_numpy(ok)


def _encode_batches(model, batches, todo, keys, vectors, ok, cache, ns, image_encoder,
                    on_torch: bool, device, precision: str, progress: bool, desc: str):
    """Run the engine over ``batches`` (``(x, ok, j)`` for ``todo[j]``), filling
    ``vectors``/``ok`` and the cache; returns when the first batch was encoded."""
    first_batch_at = None
    # torch runs the image tower in channels_last; ONNX Runtime takes plain NCHW
    fmt = torch.channels_last if on_torch else torch.contiguous_format
    if on_torch:
        model.image_model.to(memory_format=fmt)
    bar = tqdm(total=len(todo), desc=f"encode {desc}", unit="img", disable=not progress,
               leave=False)
    with eval_mode(model), torch.inference_mode():
        for x, good, idx in batches:
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with autocast(device, precision):
                e = image_encoder(x, normalize=False)
            e = F.normalize(e.float(), p=2, dim=1).cpu().numpy()
            items = []
            for row, g, j in zip(e, good.tolist(), idx.tolist()):
                i = todo[j]
                vectors[i], ok[i] = row, g
                items.append((keys[i], row, g))
            if first_batch_at is None:
                first_batch_at = time.perf_counter()
            if cache is not None:
                cache.put_many(items, ns)
            bar.update(len(idx))
    bar.close()
    return first_batch_at


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 64, device="cpu",
                 precision: str = "fp32", progress: bool = False,
                 max_length: int | None = None) -> torch.Tensor:
    """Encode texts: ``len(texts) x D`` float32 normalised on the CPU. Each distinct
    string is encoded once; batches group texts of similar length (padding to the
    longest of the batch, truncation at ``max_length`` tokens, default 50:
    ``models.align.tokenize``)."""
    device = torch.device(device)
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return torch.empty(0, getattr(getattr(model, "arch", None), "embed_dim", 0))
    order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
    out: list[torch.Tensor | None] = [None] * len(distinct)
    with eval_mode(model), torch.inference_mode():
        for a in tqdm(range(0, len(order), batch_size), desc="encode texts", disable=not progress,
                      leave=False):
            ids = order[a:a + batch_size]
            enc = tokenize(tokenizer, [distinct[i] for i in ids], max_length or MAX_TEXT_LEN)
            with autocast(device, precision):
                e = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                      normalize=False)
            e = F.normalize(e.float(), p=2, dim=1).cpu()
            for i, row in zip(ids, e):
                out[i] = row
    table = torch.stack(out)
    index = {t: i for i, t in enumerate(distinct)}
    return table[torch.tensor([index[t] for t in texts], dtype=torch.long)]
