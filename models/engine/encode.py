"""Batched encoding of images and texts: float32 L2-normalised vectors on the CPU, the model left as
found. ONNX Runtime on a CPU runs in lanes (one thread per core decodes a batch, then encodes it);
torch keeps every core for its threads beside decoding processes (README, Speed)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.args import Encoding
from utils.formats import SIZE, ImageDataset, load_image_into

log = logging.getLogger(__name__)

MAX_TEXT_LEN = 50  # tokens (SPEC 2)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_BATCH = 256  # on any device: on a CPU too, 16 was slower (README, Speed)
DECODE_SHARE, MAX_WORKERS = 2, 8  # decoding processes beside torch: one per 2 cores, at most 8


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def engine_defaults(device, engine: str = "torch") -> tuple[int, int]:
    """``(batch size, decoding workers)``: CUDA 128, a worker per core; CPU torch 32, a decoder per ``DECODE_SHARE``
    cores beside its threads; ONNX Runtime 4 (78 img/s on 2 lanes, 67 at 16), with one lane every core but its own."""
    n = cpu_cores()
    if torch.device(device).type == "cuda":
        return 128, max(1, min(n, MAX_WORKERS))
    if engine == "onnx":
        return 4, max(1, min(n - 1, MAX_WORKERS))
    return 32, max(1, min(n // DECODE_SHARE, MAX_WORKERS))


def default_lanes() -> int:
    """One lane per core torch would use (fewer under ``OMP_NUM_THREADS``, in a Ray actor)."""
    return max(1, min(cpu_cores(), torch.get_num_threads()))


def _warn_if_emulated(device, precision: str) -> None:
    """A warning where bf16/fp16 are emulated (they pay only on a GPU, AVX-512 BF16 or AMX)."""
    if precision == "fp32" or device.type != "cpu":
        return
    try:  # private helpers of this torch build; when missing, assume it is fine
        bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        native = bf16 if precision == "bf16" else torch.cpu._is_amx_fp16_supported()
    except AttributeError:
        return
    if not native:
        cpu = torch.backends.cpu.get_cpu_capability()
        log.warning("precision %s is emulated on this CPU (%s): expect it far slower than fp32", precision, cpu)


def autocast(device, precision: str):
    return torch.autocast(torch.device(device).type, dtype=_DTYPES.get(precision), enabled=precision != "fp32")


@contextlib.contextmanager
def eval_mode(model, channels_last=None):
    """The model in eval mode (and ``channels_last`` in that format: faster CPU convolutions), restored after."""
    was = model.training
    conv = next((p for p in channels_last.parameters() if p.dim() == 4), None) if channels_last is not None else None
    restore = torch.contiguous_format if conv is None or conv.is_contiguous() else torch.channels_last
    model.eval()
    if conv is not None:
        channels_last.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.train(was)
        if conv is not None:
            channels_last.to(memory_format=restore)


def tokenize(tokenizer, texts: list[str]) -> dict:
    """Pad to the longest text of the batch, truncate at ``MAX_TEXT_LEN`` tokens (SPEC 2)."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=MAX_TEXT_LEN, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def encode_images(model, paths, enc=Encoding(), *, engine=None, loader=None, cache=None, stats=None, desc="images"):
    """``(emb, ok)`` of image files, ``ok`` False where unreadable (the zero image's vector, SPEC 3).
    ``engine()`` gives the ``f(x, normalize)`` to run, asked only when some image is not in ``cache``."""
    t0 = time.perf_counter()
    paths = [str(p) for p in paths]
    n = len(paths)
    vectors: list[np.ndarray | None] = [None] * n
    ok = np.ones(n, dtype=bool)
    keys, found, ns = [None] * n, {}, None
    if cache is not None:
        ns = cache.namespace(enc.preprocess, enc.precision)
        keys = cache.content_keys(paths)
        found = cache.get_many(keys, ns, model.embed_dim)
    for i, k in enumerate(keys):
        if k in found:
            vectors[i], ok[i] = found[k]
    n_cached = sum(v is not None for v in vectors)
    first_of: dict[str, int] = {}  # one path per distinct content still to encode
    todo = [i for i, k in enumerate(keys) if vectors[i] is None and (k is None or first_of.setdefault(k, i) == i)]
    info = {"num_workers": 0, "lanes": 0, "batch_size": None, "first_batch_at": None}

    def put(e: np.ndarray, good: list, idx: list) -> None:  # normalised rows for todo[j], j in idx
        rows = [todo[j] for j in idx]
        for i, row, g in zip(rows, e, good):
            vectors[i], ok[i] = row, g
        if cache is not None:  # stored as they come: an interrupted run keeps what it encoded
            cache.put_many([(keys[i], vectors[i], bool(ok[i])) for i in rows], ns)
        bar.update(len(rows))
        info["first_batch_at"] = info["first_batch_at"] or time.perf_counter()

    with tqdm(total=len(todo), desc=f"encode {desc}", unit="img", disable=not enc.progress, leave=False) as bar:
        if todo:
            info.update(_run(model, [paths[i] for i in todo], enc, engine, loader, put))
    for i in range(n):  # copies of encoded content
        if vectors[i] is None:
            vectors[i], ok[i] = vectors[first_of[keys[i]]], ok[first_of[keys[i]]]
    emb = torch.from_numpy(np.stack(vectors).astype(np.float32, copy=False)) if n else torch.empty(0, model.embed_dim)
    seconds = time.perf_counter() - t0
    result = {"total": n, "encoded": len(todo), "cached": n_cached, "unreadable": int((~ok).sum()), "seconds": seconds}
    if stats is not None:
        stats.update(result, **info)
    log.info(
        f"images: {n} total, {len(todo)} encoded, {n_cached} from cache, {result['unreadable']} unreadable, "
        f"{seconds:.1f} s ({len(todo) / max(seconds, 1e-9):.1f} img/s encoded)"
    )
    return emb, torch.from_numpy(ok)


def _run(model, paths: list[str], enc: Encoding, engine, loader, put) -> dict:
    """Encode ``paths`` into ``put`` in lanes (an engine with ``lanes > 1`` on a CPU: they decode their own
    batches, no worker process) or here beside decoding workers; returns the settings."""
    device = next(model.parameters()).device
    encoder = engine() if engine is not None else model.encode_image
    on_torch = getattr(encoder, "__self__", None) is model
    default_batch, default_workers = engine_defaults(device, "torch" if on_torch else "onnx")
    batch_size = enc.batch_size or default_batch
    lanes = getattr(encoder, "lanes", 1) if device.type == "cpu" and not on_torch else 1
    if lanes > 1:
        _encode_lanes(paths, enc.preprocess, loader, batch_size, encoder, lanes, put)
        return {"num_workers": 0, "lanes": lanes, "batch_size": batch_size}
    workers = default_workers if enc.num_workers is None else enc.num_workers
    workers_only = {"prefetch_factor": 4} if workers else {}  # torch's workers run on one thread each
    dataset, pin = ImageDataset(paths, enc.preprocess, loader=loader), device.type == "cuda"
    _warn_if_emulated(device, enc.precision)
    fmt = torch.channels_last if on_torch else torch.contiguous_format  # ONNX Runtime takes plain NCHW
    with eval_mode(model, model.image_model if on_torch else None), torch.inference_mode():
        for x, good, idx in DataLoader(dataset, batch_size, num_workers=workers, pin_memory=pin, **workers_only):
            with autocast(device, enc.precision):
                e = encoder(x.to(device, non_blocking=True).contiguous(memory_format=fmt), normalize=False)
            put(_normalized(e), good.tolist(), idx.tolist())
    return {"num_workers": workers, "lanes": lanes, "batch_size": batch_size}


def _normalized(e: torch.Tensor) -> np.ndarray:
    return F.normalize(e.float(), p=2, dim=1).cpu().numpy()


def _encode_lanes(paths, mode: str, loader, batch_size: int, encoder, lanes: int, put):
    """``lanes`` threads each decode a batch into their own buffer and encode it (ONNX Runtime releases the
    GIL); ``put`` is called from this thread as batches finish. A failure stops the batches not begun."""
    local = threading.local()

    def encode(a: int):
        idx = range(a, min(a + batch_size, len(paths)))
        if loader is not None:  # another model's preprocessing, its own tensors
            got = [loader(paths[j], mode) for j in idx]
            x, good = torch.stack([x for x, _ in got]).numpy(), [bool(g) for _, g in got]
        else:
            if not hasattr(local, "buf"):
                local.buf = np.empty((batch_size, 3, SIZE, SIZE), dtype=np.float32)
            good = [bool(load_image_into(local.buf[r], paths[j], mode)) for r, j in enumerate(idx)]
            x = local.buf[: len(idx)]
        return _normalized(encoder(torch.from_numpy(x), normalize=False)), good, list(idx)

    pool = ThreadPoolExecutor(lanes, thread_name_prefix="lane-")
    try:  # as_completed lets go of each batch once it is put
        for done in as_completed([pool.submit(encode, a) for a in range(0, len(paths), batch_size)]):
            put(*done.result())
    finally:
        pool.shutdown(cancel_futures=True)  # the running batches finish, the others never start


def encode_texts(model, tokenizer, texts, enc: Encoding = Encoding()):
    """``len(texts) x D``, each distinct text once, in batches of similar length (``TEXT_BATCH``)."""
    device = next(model.parameters()).device
    batch_size = enc.text_batch_size or TEXT_BATCH
    distinct = sorted(dict.fromkeys(texts), key=len)
    if not distinct:
        return torch.empty(0, model.embed_dim)
    rows = []
    with eval_mode(model), torch.inference_mode():
        for a in tqdm(range(0, len(distinct), batch_size), desc="encode texts", disable=not enc.progress, leave=False):
            t = tokenize(tokenizer, distinct[a : a + batch_size])
            with autocast(device, enc.precision):
                e = model.encode_text(t["input_ids"].to(device), t["attention_mask"].to(device), normalize=False)
            rows.append(F.normalize(e.float(), p=2, dim=1).cpu())
    index = {t: i for i, t in enumerate(distinct)}
    return torch.cat(rows)[torch.tensor([index[t] for t in texts], dtype=torch.long)]
