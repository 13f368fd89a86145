"""The flags several scripts share, defined once: one name, one default, one help text.

    p = argparse.ArgumentParser(...)
    args.add_recall_files(p)       # --checkpoint --bert-dir --arch
    args.add_engine(p)             # --device --backend --precision --preprocess
    args.add_batches(p, head=True) # --batch-size --text-batch-size --head-batch-size --num-workers
    args.add_cache(p)              # --cache-dir
    args.add_run(p)                # --no-progress --log-level
    ns = p.parse_args(argv)
    enc = args.Encoding.from_args(ns)   # what the engine is given (models.engine)

Flags meant to differ per script (training batch size, learning rate, epochs, timeouts
and failure budgets) stay in the scripts. ``tests/test_layout.py`` checks that no script
defines a flag of these groups itself.
"""

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
    """``--no-progress`` and ``--log-level`` (every script)."""
    g = _group(p, title)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--log-level",
        default="INFO",
        choices=LOG_LEVELS,
        type=str.upper,
        help="log messages of this level and above on stderr (default INFO)",
    )
    return g


def add_device(p, title: str | None = None):
    g = _group(p, title)
    g.add_argument(
        "--device",
        choices=cli.DEVICE_CHOICES,
        default="auto",
        help="where models run: auto = CUDA when present, else CPU (default auto)",
    )
    return g


def add_engine(p, title: str | None = "engine", device: bool = True, precision: bool = True):
    """``--device``, ``--backend``, ``--precision``, ``--preprocess``."""
    g = _group(p, title)
    if device:
        add_device(g)
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image engine: auto (default) = ONNX Runtime on a CPU when it is installed and "
        "agrees with torch on this model (checked on every load), else torch; torch; "
        "onnx (CPU, fp32)",
    )
    if precision:
        g.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="fp32",
            help="fp32 (default, exact); bf16/fp16 autocast: faster only with native support "
            "(GPU, AVX-512 BF16/AMX CPUs); scores move ~1e-2",
        )
    g.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="reference",
        help="reference = the authors' exact path (default); fast = JPEG draft decoding",
    )
    return g


def add_batches(
    p,
    title: str | None = "batches",
    text: bool = True,
    head: bool = False,
    workers_alias: bool = False,
    images: bool = True,
):
    """``--batch-size`` (images; ``images=False``: left to the script's group, as the
    trainers' global batch), ``--text-batch-size``, ``--head-batch-size``,
    ``--num-workers`` (``workers_alias``: also the old spelling ``--workers``)."""
    g = _group(p, title)
    if images:
        g.add_argument(
            "--batch-size",
            type=cli.positive_int,
            help="images per batch (default: 4 per lane with ONNX Runtime on a CPU, 32 with torch, 128 on CUDA)",
        )
    if text:
        g.add_argument(
            "--text-batch-size", type=cli.positive_int, help="texts per batch (default: 16 on a CPU, 256 on CUDA)"
        )
    if head:
        g.add_argument(
            "--head-batch-size",
            type=cli.positive_int,
            default=DEFAULT_HEAD_BATCH,
            help=f"rows per ranker-head batch (default {DEFAULT_HEAD_BATCH})",
        )
    names = ("--num-workers", "--workers") if workers_alias else ("--num-workers",)
    g.add_argument(
        *names,
        dest="num_workers",
        type=cli.non_negative_int,
        help="image decoding worker processes (default: by core count and engine; 0 = none). "
        "With ONNX Runtime on a CPU the engine's lanes decode, and workers only decode "
        "the first images while the model loads",
    )
    return g


def add_cache(p, title: str | None = None):
    g = _group(p, title)
    g.add_argument(
        "--cache-dir",
        help="embedding cache directory: a rerun encodes only new images (the ONNX export is kept in its onnx/ folder)",
    )
    return g


def add_recall_files(
    p, title: str | None = "model files", checkpoint: str | None = "--checkpoint", required: bool = True
):
    """``--checkpoint`` (named ``checkpoint``; None leaves it to the script), ``--bert-dir``,
    ``--arch``."""
    g = _group(p, title)
    if checkpoint:
        g.add_argument(
            checkpoint,
            required=required,
            help="model weights (align_model.pth, or a ranker checkpoint holding its recall model under align_model.)",
        )
    g.add_argument("--bert-dir", required=required, help="directory with bert-base-chinese config.json and vocab.txt")
    g.add_argument(
        "--arch",
        help="architecture JSON of a non-default (small) model (default: recorded "
        "in the checkpoint or its .arch.json sidecar, else the released one)",
    )
    return g


def add_poi_tables(p, title: str | None = "POI tables", required: bool = False, aliases: bool = False):
    """The ranker's three POI tables and ``--trust-pickle`` (``aliases``: also the old
    spellings ``--pic-num``, ``--img-vectors``, ``--name-vectors``)."""
    g = _group(p, title)
    for name, old, what in (
        ("--poi-pic-num", "--pic-num", "pic-num table (name -> [n0, n1, n2])"),
        ("--poi-image-vectors", "--img-vectors", "POI mean image vector table"),
        ("--poi-name-vectors", "--name-vectors", "POI name vector table"),
    ):
        g.add_argument(
            name, *((old,) if aliases else ()), required=required, help=f"{what}: the published .npy or the safe .npz"
        )
    g.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read .npy tables with plain np.load(allow_pickle=True): code in them would run. "
        "Without it a restricted unpickler that refuses code is used",
    )
    return g


def add_bad_rows(p, title: str | None = None):
    g = _group(p, title)
    g.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="leave out input rows that cannot be used (each reported by file and line, "
        "counted in the summary) instead of stopping with exit status 2",
    )
    return g


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
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        values["progress"] = not getattr(ns, "no_progress", False)
        return cls(**{**values, **override})


# --- downloads (utils.fetch): add_downloads ----------------------------------------------


# --- training (utils.training) ------------------------------------------------------------
def add_training(p, *, batch_size: int, weight_decay: float, warmup_steps: int, schedule: str, clip_grad: float):
    """What a run of either trainer is (``utils.training.TrainConfig``); the keywords are
    the script's defaults (the authors' settings differ between the two models)."""
    g = p.add_argument_group("training")
    g.add_argument(
        "--out-dir",
        required=True,
        help="checkpoints, training state, metrics, config.json (locked for the run: a second run into it stops)",
    )
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its train_state.pt")
    g.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=batch_size,
        help="GLOBAL batch of training pairs, split over the torchrun processes (default %(default)s)",
    )
    g.add_argument("--weight-decay", type=cli.non_negative_float, default=weight_decay, help="(default %(default)s)")
    g.add_argument(
        "--warmup-steps",
        type=cli.non_negative_int,
        default=warmup_steps,
        help="linear LR warm-up (default %(default)s)",
    )
    g.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default=schedule,
        help="LR after the warm-up (default %(default)s)",
    )
    g.add_argument(
        "--clip-grad",
        type=cli.non_negative_float,
        default=clip_grad,
        help="max gradient norm, 0: off (default %(default)s)",
    )
    g.add_argument("--no-amp", action="store_true", help="no mixed precision (fp16 autocast) on CUDA")
    g.add_argument("--seed", type=cli.non_negative_int, default=0, help="data order, split, augmentation (default 0)")
    g.add_argument(
        "--save-every",
        type=cli.non_negative_int,
        default=0,
        help="also save checkpoint + state every N optimizer steps (default 0: after each epoch only)",
    )
    g.add_argument(
        "--stop-after-step",
        type=cli.non_negative_int,
        default=0,
        help="save and stop after this step (default 0: never)",
    )
    g.add_argument(
        "--eval-batch-size",
        type=cli.positive_int,
        default=32,
        help="batch of the validation and of the images encoded once (default 32)",
    )
    return g


# --- selection (utils.selection) ----------------------------------------------------------
