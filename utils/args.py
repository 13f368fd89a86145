"""The flags several scripts share, defined once: one name, one default, one help text.
``Encoding.from_args(ns)`` and ``Downloads.from_args(ns)`` turn them into the small
objects the library takes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from . import cli

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("fp32", "bf16", "fp16")
PREPROCESS_MODES = ("reference", "fast")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_HEAD_BATCH = 1024


def _group(p, title: str | None):
    return p.add_argument_group(title) if title else p


def add_run(p, title: str | None = None):
    """``--no-progress``, ``--log-level`` (every script)."""
    g = _group(p, title)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    text = "log messages of this level and above on stderr (default INFO)"
    g.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper, help=text)
    return g


def add_engine(p, title: str | None = "engine", precision: bool = True, preprocess: bool = True):
    g = _group(p, title)
    text = "where models run: auto = CUDA when present, else CPU (default auto)"
    g.add_argument("--device", choices=cli.DEVICE_CHOICES, default="auto", help=text)
    text = "image engine: auto (default) = ONNX Runtime on a CPU when it agrees with torch, else torch; onnx: fp32"
    g.add_argument("--backend", choices=BACKENDS, default="auto", help=text)
    if precision:
        text = "fp32 (default, exact); bf16/fp16 autocast: faster only with native support (GPU, AVX-512 BF16/AMX CPUs)"
        g.add_argument("--precision", choices=PRECISIONS, default="fp32", help=text)
    if preprocess:
        text = "reference = the authors' exact path (default); fast = JPEG draft decoding"
        g.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference", help=text)
    return g


def add_batches(p, title="batches", text=True, head=False, workers_alias=False, images=True):
    """``--batch-size`` (images), ``--text-batch-size``, ``--head-batch-size``, ``--num-workers``
    (``workers_alias``: also ``--workers``)."""
    g = _group(p, title)
    if images:
        info = "images per batch (default: 4 per lane with ONNX Runtime on a CPU, 32 with torch, 128 on CUDA)"
        g.add_argument("--batch-size", type=cli.positive_int, help=info)
    if text:
        g.add_argument("--text-batch-size", type=cli.positive_int, help="texts per batch (default 256)")
    if head:
        info = f"rows per ranker-head batch (default {DEFAULT_HEAD_BATCH})"
        g.add_argument("--head-batch-size", type=cli.positive_int, default=DEFAULT_HEAD_BATCH, help=info)
    names = ("--num-workers", "--workers") if workers_alias else ("--num-workers",)
    info = "image decoding worker processes (default: by core count and engine; 0 = none); "
    info += "none where ONNX Runtime runs in lanes (a CPU of 2+ cores): each lane decodes its own batches"
    g.add_argument(*names, dest="num_workers", type=cli.non_negative_int, help=info)
    return g


def add_cache(p, title: str | None = None):
    g = _group(p, title)
    text = "embedding cache directory: a rerun encodes only new images (the ONNX export is kept in its onnx/ folder)"
    g.add_argument("--cache-dir", help=text)
    return g


def add_recall_files(p, title="model files", checkpoint: str | None = "--checkpoint", required: bool = True):
    """``--checkpoint`` (None: the script names its own), ``--bert-dir``, ``--arch``."""
    g = _group(p, title)
    if checkpoint:
        text = "model weights (align_model.pth, or a ranker checkpoint holding its recall model under align_model.)"
        g.add_argument(checkpoint, required=required, help=text)
    g.add_argument("--bert-dir", required=required, help="directory with bert-base-chinese config.json and vocab.txt")
    return add_arch(g)


def add_arch(p):
    text = "architecture JSON of a small model (default: the checkpoint's or its .arch.json's, else the released)"
    p.add_argument("--arch", help=text)
    return p


def add_poi_tables(p, title: str | None = "POI tables", required: bool = False, aliases: bool = False):
    """The ranker's three POI tables and ``--trust-pickle`` (``aliases``: the old spellings too)."""
    g = _group(p, title)
    for name, old, what in (
        ("--poi-pic-num", "--pic-num", "pic-num table (name -> [n0, n1, n2])"),
        ("--poi-image-vectors", "--img-vectors", "POI mean image vector table"),
        ("--poi-name-vectors", "--name-vectors", "POI name vector table"),
    ):
        names = (name, old) if aliases else (name,)
        g.add_argument(*names, required=required, help=f"{what}: the published .npy or the safe .npz")
    add_trust_pickle(g)
    return g


def add_trust_pickle(p):
    text = "read .npy tables with np.load(allow_pickle=True): code in them would run (default: refuse code)"
    p.add_argument("--trust-pickle", action="store_true", help=text)
    return p


def add_bad_rows(p):
    text = "leave out unusable input rows (each reported by file and line) instead of stopping with exit status 2"
    p.add_argument("--skip-bad-rows", action="store_true", help=text)
    return p


def from_flags(cls, ns: argparse.Namespace, renamed: dict | None = None, **override):
    """A dataclass ``cls`` of the flags named as its fields (``renamed``: field -> another dest)."""
    dest = {f.name: (renamed or {}).get(f.name, f.name) for f in fields(cls)}
    return cls(**{name: getattr(ns, d) for name, d in dest.items() if hasattr(ns, d)} | override)


@dataclass(frozen=True)
class Encoding:
    """What the engine flags say, as one object for ``models.engine``."""

    device: str = "auto"
    backend: str = "auto"
    precision: str = "fp32"
    preprocess: str = "reference"
    batch_size: int | None = None
    text_batch_size: int | None = None
    head_batch_size: int = DEFAULT_HEAD_BATCH
    num_workers: int | None = None
    cache_dir: str | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, ns: argparse.Namespace, **override) -> Encoding:
        return from_flags(cls, ns, **{"progress": not getattr(ns, "no_progress", False), **override})


# --- evaluation (utils.evaluation) ------------------------------------------------------
def add_bootstrap(p):
    """``--bootstrap`` and ``--seed``: the evaluators' 95% percentile intervals."""
    from utils.evaluation import DEFAULT_DRAWS, DEFAULT_SEED, MAX_DRAWS

    text = f"bootstrap draws for the 95%% intervals (default {DEFAULT_DRAWS}, at most {MAX_DRAWS:,}; 0: none)"
    p.add_argument("--bootstrap", type=cli.non_negative_int, default=DEFAULT_DRAWS, metavar="N", help=text)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"bootstrap seed (default {DEFAULT_SEED})")
    return p


# --- downloads (utils.fetch): add_downloads, Downloads -----------------------------------
IMAGE_DEADLINE = 300.0  # seconds for one image, every URL and retry included
ASSET_DEADLINE = 3600.0  # for one asset (a partial download resumes in the next run)


@dataclass(frozen=True)
class Downloads:
    """What the download flags say, for ``utils.fetch`` (and a script's defaults)."""

    workers: int = 8
    timeout_connect: float = 10.0
    timeout_read: float = 30.0
    retries: int = 4
    backoff: float = 0.5
    deadline: float = IMAGE_DEADLINE
    allow_private: bool = False

    @property
    def timeout(self) -> tuple[float, float]:
        return self.timeout_connect, self.timeout_read

    @classmethod
    def from_args(cls, ns: argparse.Namespace, **override) -> Downloads:
        flags = {
            "workers": "download_workers",
            "deadline": "download_deadline",
            "allow_private": "allow_private_addresses",
        }
        return from_flags(cls, ns, flags, **override)


IMAGE_DOWNLOADS = Downloads(workers=16)  # download_images.py's defaults
ASSET_DOWNLOADS = Downloads(timeout_read=60.0, retries=3, deadline=ASSET_DEADLINE)  # download_assets.py's
ALLOW_PRIVATE_HELP = (
    "allow URLs and redirects that lead to link-local, private or loopback addresses (by default only a URL "
    "naming such an address literally, or a host you named: --mirror, --url-prefix-map, HF_ENDPOINT)"
)


def add_downloads(p, defaults: Downloads | None = None, worker_flags=("--download-workers",), title="downloads"):
    """How downloads run, with this script's ``defaults``; ``worker_flags``: the names of the
    workers flag (none: no such flag)."""
    d, g = defaults or Downloads(), _group(p, title)
    if worker_flags:
        text = f"concurrent downloads (default {d.workers})"
        g.add_argument(
            *worker_flags, dest="download_workers", metavar="N", type=cli.positive_int, default=d.workers, help=text
        )
    text = f"connect timeout, seconds (default {d.timeout_connect:g})"
    g.add_argument("--timeout-connect", type=cli.positive_float, default=d.timeout_connect, help=text)
    text = f"read timeout: the longest silence between bytes, seconds (default {d.timeout_read:g})"
    g.add_argument("--timeout-read", "--timeout", type=cli.positive_float, default=d.timeout_read, help=text)
    text = f"retries per request on connection errors, timeouts, 429 and 5xx (default {d.retries})"
    g.add_argument("--retries", type=cli.non_negative_int, default=d.retries, help=text)
    text = f"waits between retries grow as BACKOFF*2^n seconds plus jitter; 0: no wait (default {d.backoff:g})"
    g.add_argument("--backoff", type=cli.non_negative_float, default=d.backoff, help=text)
    text = f"a download still running after this long fails: a server trickling its bytes (default {d.deadline:g})"
    g.add_argument("--download-deadline", metavar="SECONDS", type=cli.positive_float, default=d.deadline, help=text)
    g.add_argument("--allow-private-addresses", action="store_true", help=ALLOW_PRIVATE_HELP)
    return g


# --- training (utils.training) ------------------------------------------------------------
def add_training(p, *, batch_size: int, weight_decay: float, warmup_steps: int, schedule: str, clip_grad: float):
    """Either trainer's engine, loader and training flags; keywords: its defaults (the authors' differ per model)."""
    add_engine(p, precision=False)
    add_batches(p, text=False, images=False, workers_alias=True)
    g = p.add_argument_group("training")
    text = "checkpoints, training state, metrics, config.json (locked for the run: a second run into it stops)"
    g.add_argument("--out-dir", required=True, help=text)
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its train_state.pt")
    g.add_argument("--no-amp", action="store_true", help="no mixed precision (fp16 autocast) on CUDA")
    text = "LR after the warm-up (default %(default)s)"
    g.add_argument("--schedule", choices=("cosine", "constant"), default=schedule, help=text)
    for flag, kind, default, text in (
        ("--batch-size", cli.positive_int, batch_size, "GLOBAL batch of pairs, split over the torchrun processes"),
        ("--weight-decay", cli.non_negative_float, weight_decay, "weight decay"),
        ("--warmup-steps", cli.non_negative_int, warmup_steps, "linear LR warm-up"),
        ("--clip-grad", cli.non_negative_float, clip_grad, "max gradient norm, 0: off"),
        ("--seed", cli.non_negative_int, 0, "data order, split, augmentation"),
        ("--save-every", cli.non_negative_int, 0, "also save checkpoint + state every N steps; 0: per epoch only"),
        ("--stop-after-step", cli.non_negative_int, 0, "save and stop after this step; 0: never"),
        ("--eval-batch-size", cli.positive_int, 32, "batch of the validation and of the images encoded once"),
    ):
        g.add_argument(flag, type=kind, default=default, help=f"{text} (default %(default)s)")
    return g


# --- selection (utils.selection) ----------------------------------------------------------
def add_ray(p, title: str | None = "Ray Data"):
    """``--ray [ADDRESS]`` and the shape of the Ray run."""
    g = _group(p, title)
    text = (
        "run on Ray Data: without ADDRESS a new local Ray started in-process (or the cluster of RAY_ADDRESS); "
        "with one, join that cluster (e.g. HOST:6379, auto; a cluster with token authentication takes "
        "RAY_AUTH_MODE=token and its token, see README)"
    )
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help=text)
    g.add_argument("--actors", type=cli.positive_int, default=1, help="scoring actors, one model set each (default 1)")
    text = "CPUs reserved per actor (default 1)"
    g.add_argument("--cpus-per-actor", type=cli.non_negative_float, default=1.0, help=text)
    text = "GPUs per actor (default 0: CPU actors)"
    g.add_argument("--gpus-per-actor", type=cli.non_negative_float, default=0.0, help=text)
    text = "items per shard, about: the unit of work, of retries and of the Parquet files (default 64)"
    g.add_argument("--shard-items", type=cli.positive_int, default=64, help=text)
    return g
