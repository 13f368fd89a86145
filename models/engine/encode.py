"""Batched encoding of images and texts with an alignment-style model, shared by the
recall, ranking and selection scripts.

    emb, ok = encode_images(model, paths, batch_size=None, device="cpu")   # N x D, N bools
    txt = encode_texts(model, tokenizer, texts, device="cpu")               # len(texts) x D

``model`` needs ``encode_image(x, normalize=False)`` (and ``image_model`` for the memory
format) and ``encode_text(input_ids, attention_mask, normalize=False)``; both returned
tensors are float32, L2-normalised, on the CPU, row i for input i.

Speed (figures: bench/bench_recall.py and the README): with ONNX Runtime on a CPU
(utils/onnx_backend.py, plain NCHW) one lane per core decodes a batch and encodes it
(see the notes on the core split below); with torch, images are decoded in DataLoader
worker processes while the engine encodes the previous batch, the image tower in
``channels_last`` under ``torch.inference_mode``; ``precision="bf16"``/``"fp16"``
adds autocast, which is faster only with native support (GPU, AVX-512 BF16 / AMX CPUs;
emulated, far slower, on AVX2-only CPUs: a warning says so) and moves scores, so fp32 is
the default. Each distinct text is encoded once, in batches of similar length.

Start-up overlap (``prefetch_images``): a script that knows its image paths before its
model is loaded starts decoding workers right after reading its input, so the first
images (``PREFETCH_IMAGES``) are decoded while the model loads;
``encode_images(..., prefetch=source)`` then consumes the batches already decoded and
decodes the rest. The batches are the ones ``encode_images`` would make itself
(same paths, order, batch size and preprocessing), so the vectors are identical; a
source that does not match the call (other paths, a cache that serves some of them) is
closed unused and the images are decoded as usual.

The model is switched to eval mode for the call and back afterwards; the torch image
tower runs in ``channels_last`` and is left in the memory format it had.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.formats import SIZE, ImageDataset, load_image_into

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
MAX_TEXT_LEN = 50  # tokens (SPEC 2)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_batch_size(device, engine: str = "torch") -> int:
    """Images per batch: 128 on CUDA; on a CPU 4 for ONNX Runtime's lanes (B3 at 224 px
    on one engine thread: 78 img/s on 2 lanes at batch 4, 67 at 16, 62 at 32; small
    batches also keep the lanes even at the end), 32 for torch."""
    if torch.device(device).type == "cuda":
        return 128
    return 4 if engine == "onnx" else 32


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# How the cores are shared on a CPU. ONNX Runtime runs in lanes: one thread per core,
# each decoding a batch and then encoding it with a single engine thread, so decoding
# and the engine never compete for a core and no engine thread waits at a barrier for a
# core that a decoder took (bench/bench_recall.py --split: 2 cores, 2 MP photos, lanes
# 0.8 of the engine alone against 0.6 for worker processes beside a 2-thread engine).
# During start-up, while the main thread loads the model, worker processes decode the
# first batches ahead (``prefetch_images``). The torch engine (and any engine on CUDA)
# keeps the classic layout: every core for its threads, and decoding worker processes
# (one per DECODE_SHARE cores on a CPU, every core up to MAX_WORKERS on CUDA).
DECODE_SHARE = 2
MAX_WORKERS = 8


def default_num_workers(device, backend: str = "torch") -> int:
    """Decoding worker processes. ``backend``: the engine that runs (``"torch"`` or
    ``"onnx"``). CPU + torch: one per ``DECODE_SHARE`` cores; CPU + onnx: the workers that
    decode ahead during start-up, every core but the one loading the model; CUDA: every
    core. At least 1, at most ``MAX_WORKERS``."""
    n = cpu_cores()
    if torch.device(device).type == "cuda":
        return max(1, min(n, MAX_WORKERS))
    if backend == "onnx":
        return max(1, min(n - 1, MAX_WORKERS))
    return max(1, min(n // DECODE_SHARE, MAX_WORKERS))


def default_lanes() -> int:
    """Lanes of the CPU engine (ONNX Runtime): one per core torch would use (its
    intra-op threads: the physical cores by default, fewer under ``OMP_NUM_THREADS`` or
    ``torch.set_num_threads``, as in a Ray actor given fewer CPUs than the node has)."""
    return max(1, min(cpu_cores(), torch.get_num_threads()))


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
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _worker_init(_):
    torch.set_num_threads(1)


# Images a prefetch source decodes ahead (~0.6 MB each): the first PREFETCH_IMAGES of the
# list, enough for the model load and engine set-up on a few cores (2 MP photos decode in
# ~7 ms); the engine decodes the rest as it goes.
PREFETCH_IMAGES = 256


def _loader(
    paths: list[str],
    mode: str,
    image_loader,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    prefetch_factor: int = 4,
) -> DataLoader:
    return DataLoader(
        ImageDataset(paths, mode, loader=image_loader),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False,
    )


def _shifted(batches, offset: int):
    for x, ok, idx in batches:
        yield x, ok, idx + offset


class ImagePrefetch:
    """Decoding of the first ``depth`` of ``paths`` (default ``PREFETCH_IMAGES``, whole
    batches) started now, in DataLoader worker processes, while the caller does something
    else (loads the model); ``encode_images(..., prefetch=self)`` consumes those batches
    and decodes the rest itself. Made by :func:`prefetch_images`. ``close()`` (or
    ``with``) stops the workers of a source that is not consumed; one that is consumed is
    closed by ``encode_images``. With ``num_workers=0`` nothing runs ahead."""

    def __init__(
        self,
        paths,
        batch_size: int | None = None,
        device="cpu",
        mode: str = "reference",
        num_workers: int | None = None,
        image_loader=None,
        backend: str = "onnx",
        depth: int = PREFETCH_IMAGES,
    ):
        self.device = torch.device(device)
        self.paths = [str(p) for p in paths]
        self.requested_batch_size = batch_size
        self.batch_size = batch_size or default_batch_size(self.device, backend)
        self.mode, self.image_loader = mode, image_loader
        self.num_workers = default_num_workers(self.device, backend) if num_workers is None else num_workers
        self.count = min(len(self.paths), max(1, depth // self.batch_size) * self.batch_size)
        factor = max(2, -(-self.count // (self.batch_size * max(self.num_workers, 1))))
        self._it = (
            iter(
                _loader(
                    self.paths[: self.count], mode, image_loader, self.batch_size, self.num_workers, self.device, factor
                )
            )
            if self.paths
            else None
        )

    def matches(self, paths: list[str], batch_size: int | None, mode: str, image_loader) -> bool:
        """True when consuming this source gives exactly the batches of these arguments
        (``batch_size`` None: the default, as the source was started with)."""
        return (
            self._it is not None
            and paths == self.paths
            and mode == self.mode
            and batch_size == self.requested_batch_size
            and image_loader is self.image_loader
        )

    def take(self):
        """The iterator over the batches decoded ahead (once); the source is empty afterwards."""
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


def prefetch_images(
    paths,
    batch_size: int | None = None,
    device="cpu",
    mode: str = "reference",
    num_workers: int | None = None,
    image_loader=None,
    backend: str = "auto",
    precision: str = "fp32",
) -> ImagePrefetch:
    """Start decoding the first images of ``paths`` now (see :class:`ImagePrefetch`), for
    a later ``encode_images(model, paths, batch_size, device, mode=mode,
    num_workers=num_workers, prefetch=source)`` without a cache. ``backend``/``precision``
    (the requested engine) only pick the default worker count before the engine is known:
    ONNX Runtime's when ``auto`` would choose it (CPU, fp32), else torch's."""
    dev = torch.device(device)
    likely = "onnx" if backend in ("auto", "onnx") and dev.type == "cpu" and precision == "fp32" else "torch"
    return ImagePrefetch(paths, batch_size, dev, mode, num_workers, image_loader, likely)


def encode_images(
    model,
    paths: Sequence[str | os.PathLike],
    batch_size: int | None = None,
    device="cpu",
    mode: str = "reference",
    num_workers: int | None = None,
    precision: str = "fp32",
    cache=None,
    stats: dict | None = None,
    progress: bool = True,
    desc: str = "images",
    image_loader=None,
    image_encoder=None,
    engine=None,
    prefetch: ImagePrefetch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode image files: returns ``(emb, ok)``, ``emb`` N x D float32 (normalised,
    CPU), ``ok`` a bool tensor, False where the file was missing or unreadable (its row
    is the embedding of the zero image, SPEC 3 step 4; callers decide to keep or drop it).

    ``mode``: preprocessing, ``"reference"`` or ``"fast"`` (utils.images).
    ``image_loader``: another model's preprocessing ``f(path, mode) -> (tensor, ok)``
    (picklable; default ``utils.images.load_image``); see ``models.factory``.
    ``batch_size`` / ``num_workers``: None picks the device default. With an engine run
    in lanes (``image_encoder.lanes > 1``: ONNX Runtime on a CPU) the lanes decode, and
    ``num_workers`` only counts the processes of a prefetch source.
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
    ``num_workers``, ``lanes``, ``batch_size`` and ``first_batch_at``
    (``time.perf_counter()`` when the first batch was encoded, None if none was: what
    start-up time is measured to).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    paths = [str(p) for p in paths]
    n = len(paths)
    ns = cache.namespace(mode, precision) if cache is not None else None
    if not native_low_precision(device, precision):
        log.warning(
            "precision %s on this CPU (%s) has no native support and is emulated: expect it to be far slower than fp32",
            precision,
            torch.backends.cpu.get_cpu_capability(),
        )

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
    first_batch_at, lanes = None, 0

    try:
        if todo:
            ahead, ahead_count = None, 0
            if (
                prefetch is not None
                and len(todo) == n
                and (num_workers is None or num_workers == prefetch.num_workers)
                and prefetch.matches(paths, batch_size, mode, image_loader)
            ):
                num_workers, ahead_count, ahead = prefetch.num_workers, prefetch.count, prefetch.take()
                batch_size = prefetch.batch_size
                log.debug("images: consuming the first %d images decoded ahead", ahead_count)
            elif prefetch is not None:
                log.debug("images: prefetched batches do not match this call; decoding anew")
                prefetch.close()
            if image_encoder is None:
                image_encoder = engine() if engine is not None else model.encode_image
            on_torch = getattr(image_encoder, "__self__", None) is model
            batch_size = batch_size or default_batch_size(device, "torch" if on_torch else "onnx")
            todo_paths = [paths[i] for i in todo]
            sink = _Sink(todo, keys, vectors, ok, cache, ns, progress, desc)
            lanes = getattr(image_encoder, "lanes", 1) if device.type == "cpu" and not on_torch else 1
            if lanes > 1:
                if ahead is not None and not num_workers:  # nothing decoded ahead: the lanes
                    ahead, ahead_count = None, 0  # decode every batch, side by side
                if num_workers is None:
                    num_workers = 0
                _encode_lanes(
                    _Feed(todo_paths, batch_size, mode, image_loader, ahead, ahead_count), image_encoder, lanes, sink
                )
            else:
                if num_workers is None:
                    num_workers = default_num_workers(device, "torch" if on_torch else "onnx")
                batches = ahead
                if ahead is None or ahead_count < len(todo):
                    rest = iter(
                        _loader(todo_paths[ahead_count:], mode, image_loader, batch_size, num_workers, device)
                    )  # its workers start now
                    batches = itertools.chain(ahead or (), _shifted(rest, ahead_count))
                _encode_batches(model, batches, image_encoder, on_torch, device, precision, sink)
            sink.close()
            first_batch_at = sink.first_batch_at
    finally:
        if prefetch is not None:
            prefetch.close()
    # duplicates of encoded content
    for i in range(n):
        if vectors[i] is None:
            j = first_of[keys[i]]
            vectors[i], ok[i] = vectors[j], ok[j]

    dim = getattr(getattr(model, "arch", None), "embed_dim", None)
    emb = torch.from_numpy(np.stack(vectors).astype(np.float32, copy=False)) if n else torch.empty(0, dim or 0)
    result = {
        "total": n,
        "encoded": len(todo),
        "cached": n_cached,
        "unreadable": int((~ok).sum()),
        "seconds": time.perf_counter() - t0,
        "num_workers": num_workers if todo else 0,
        "lanes": lanes,
        "batch_size": batch_size if todo else None,
        "first_batch_at": first_batch_at,
    }
    if stats is not None:
        stats.update(result)
    log.info(
        "images: %d total, %d encoded, %d from cache, %d unreadable, %.1f s (%.1f img/s encoded)",
        n,
        len(todo),
        n_cached,
        result["unreadable"],
        result["seconds"],
        len(todo) / max(result["seconds"], 1e-9),
    )
    return emb, torch.from_numpy(ok)


class _Sink:
    """Where encoded batches go: ``vectors``/``ok`` by position, the cache, the bar."""

    def __init__(self, todo, keys, vectors, ok, cache, ns, progress: bool, desc: str):
        self.todo, self.keys, self.vectors, self.ok = todo, keys, vectors, ok
        self.cache, self.ns = cache, ns
        self.first_batch_at = None  # time.perf_counter() of the first batch put
        self.bar = tqdm(total=len(todo), desc=f"encode {desc}", unit="img", disable=not progress, leave=False)

    def put(self, e: np.ndarray, good, idx) -> None:
        """Rows ``e`` (normalised) for ``todo[j]``, ``j`` in ``idx``."""
        items = []
        for row, g, j in zip(e, good, idx):
            i = self.todo[j]
            self.vectors[i], self.ok[i] = row, bool(g)
            items.append((self.keys[i], row, bool(g)))
        if self.cache is not None:
            self.cache.put_many(items, self.ns)
        self.bar.update(len(items))
        if self.first_batch_at is None:
            self.first_batch_at = time.perf_counter()

    def close(self) -> None:
        self.bar.close()


def _encode_batches(model, batches, image_encoder, on_torch: bool, device, precision: str, sink: _Sink) -> None:
    """Run the engine over ``batches`` (``(x, ok, j)`` for ``todo[j]``) in this thread."""
    # torch runs the image tower in channels_last; ONNX Runtime takes plain NCHW
    fmt = torch.channels_last if on_torch else torch.contiguous_format
    with eval_mode(model), channels_last(model.image_model if on_torch else None), torch.inference_mode():
        for x, good, idx in batches:
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with autocast(device, precision):
                e = image_encoder(x, normalize=False)
            sink.put(F.normalize(e.float(), p=2, dim=1).cpu().numpy(), good.tolist(), idx.tolist())


@contextlib.contextmanager
def channels_last(module):
    """``module``'s 4-d weights in ``channels_last`` for the block (same values, faster
    convolutions on a CPU), then in the memory format they had before."""
    weights = [p for p in module.parameters() if p.dim() == 4] if module is not None else []
    if not weights:
        yield
        return
    before = (
        torch.channels_last
        if weights[0].is_contiguous(memory_format=torch.channels_last) and not weights[0].is_contiguous()
        else torch.contiguous_format
    )
    module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        module.to(memory_format=before)


class _Feed:
    """The batches of ``paths`` in order, for lanes: the first ``ahead_count`` images come
    from ``ahead`` (batches decoded by a prefetch source), the others are decoded by the
    lane that takes them, into that lane's buffer."""

    def __init__(self, paths, batch_size: int, mode: str, image_loader, ahead, ahead_count: int):
        self.paths, self.batch_size, self.mode, self.image_loader = paths, batch_size, mode, image_loader
        self.ahead, self.ahead_count = ahead, ahead_count  # 0 without a source
        self.next = 0
        self.lock = threading.Lock()

    def take(self, buf: np.ndarray):
        """``(x, ok, idx)`` of the next batch, or None when there is none."""
        with self.lock:  # the prefetch iterator is read in order, by one lane at a time
            a = self.next
            if a >= len(self.paths):
                return None
            self.next = min(a + self.batch_size, len(self.paths))
            if a < self.ahead_count:
                x, good, idx = next(self.ahead)
                return x.numpy(), good.numpy(), idx.numpy()
        idx = np.arange(a, min(a + self.batch_size, len(self.paths)))
        if self.image_loader is not None:  # another model's preprocessing, its own tensors
            got = [self.image_loader(self.paths[j], self.mode) for j in idx]
            return torch.stack([x for x, _ in got]).numpy(), np.array([g for _, g in got]), idx
        good = np.empty(len(idx), dtype=bool)
        for r, j in enumerate(idx):
            good[r] = load_image_into(buf[r], self.paths[j], self.mode)
        return buf[: len(idx)], good, idx


def _encode_lanes(feed: _Feed, image_encoder, lanes: int, sink: _Sink) -> None:
    """Run ``lanes`` threads, each taking the next batch from ``feed`` (decoding it if
    need be) and encoding it (ONNX Runtime releases the GIL; it never touches the torch
    model); the results go to ``sink`` from this thread."""
    done: queue.Queue = queue.Queue()
    stop = threading.Event()
    shape = (feed.batch_size, 3, SIZE, SIZE)

    def lane():
        try:
            buf = np.empty(shape, dtype=np.float32)
            while not stop.is_set():
                item = feed.take(buf)
                if item is None:
                    break
                x, good, idx = item
                e = image_encoder(torch.from_numpy(x), normalize=False)
                e = F.normalize(e.float(), p=2, dim=1).numpy()
                done.put((e, good.tolist(), idx.tolist()))
            done.put(None)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller's thread)
            done.put(exc)

    threads = [threading.Thread(target=lane, name=f"lane-{k}", daemon=True) for k in range(lanes)]
    for t in threads:
        t.start()
    try:
        running = lanes
        while running:
            item = done.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                sink.put(*item)
    finally:
        stop.set()
        for t in threads:
            t.join()


def default_text_batch_size(device) -> int:
    """Texts per batch: 16 on a CPU (the 4-layer BERT runs 1.4x faster there than in
    batches of 64: smaller activations stay in cache), 256 on CUDA."""
    return 256 if torch.device(device).type == "cuda" else 16


def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int | None = None,
    device="cpu",
    precision: str = "fp32",
    progress: bool = False,
    max_length: int | None = None,
) -> torch.Tensor:
    """Encode texts: ``len(texts) x D`` float32 normalised on the CPU. Each distinct
    string is encoded once; batches group texts of similar length (padding to the
    longest of the batch, truncation at ``max_length`` tokens, default 50:
    ``models.align.tokenize``); ``batch_size`` None: :func:`default_text_batch_size`."""
    device = torch.device(device)
    batch_size = batch_size or default_text_batch_size(device)
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return torch.empty(0, getattr(getattr(model, "arch", None), "embed_dim", 0))
    order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
    out: list[torch.Tensor | None] = [None] * len(distinct)
    with eval_mode(model), torch.inference_mode():
        for a in tqdm(range(0, len(order), batch_size), desc="encode texts", disable=not progress, leave=False):
            ids = order[a : a + batch_size]
            enc = tokenize(tokenizer, [distinct[i] for i in ids], max_length or MAX_TEXT_LEN)
            with autocast(device, precision):
                e = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device), normalize=False)
            e = F.normalize(e.float(), p=2, dim=1).cpu()
            for i, row in zip(ids, e):
                out[i] = row
    table = torch.stack(out)
    index = {t: i for i, t in enumerate(distinct)}
    return table[torch.tensor([index[t] for t in texts], dtype=torch.long)]
