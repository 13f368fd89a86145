"""The one way checkpoints are read and written, for both models.

Released formats (SPEC sections 2 and 5):
- recall (``align_model.pth``): ``torch.save({"state_dict": sd})``;
- ranker (``shoucai_siamese_...ckpt``): a bare state dict holding a full copy of
  the recall model under ``align_model.``.

Known wrappers are recognised with an INFO notice (SPEC formats need none): a state
dict saved through ``DataParallel``/DDP (every key under ``module.``), ``{"model": sd}``,
``{"state_dict": sd}`` with other entries (a training script's), and PyTorch Lightning's
``{"state_dict": {"model.<key>": ...}, "epoch": ...}`` (every key under ``model.``). Only
a prefix that EVERY key carries is removed; anything else stays as it is and goes through
the strict check.

Loading uses ``torch.load(..., weights_only=True)`` and strict key checking: the only
keys tolerated beyond the model's are the benign ones SPEC names (a persisted
``position_ids`` buffer of older transformers, the knowledge-graph head of the
training variant), and they are reported. Anything else missing or unexpected, or a
shape mismatch, raises ``CheckpointError`` listing the keys.

Small architecture variants (tests, users' own training) record their ``AlignArch``
in the wrapper (``"arch"``) or, for the bare ranker format, in a sidecar
``<checkpoint>.arch.json``; the released files carry neither and get the defaults.
"""

from __future__ import annotations

from utils.cli import UserError

import logging
import os

import torch

from utils.io import atomic_path, write_json

from .align import AlignArch, AlignModel, skip_init
from .ranker import SiameseRanker

log = logging.getLogger(__name__)

BENIGN_EXTRAS = (
    "text_model.embeddings.position_ids",
    "relations_emb.weight",
    "linear_relation.weight",
    "linear_relation.bias",
)
ALIGN_PREFIX = "align_model."  # where the ranker keeps its copy of the recall model
WRAPPER_PREFIXES = ("module.", "model.")  # DataParallel/DDP, Lightning


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not match the model."""


def _strip_common_prefix(sd: dict, prefix: str) -> dict | None:
    """``sd`` without ``prefix`` when every key carries it, else None."""
    if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return None


def unwrap_state(obj: dict, path: str) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a loaded checkpoint object: the authors' ``{"state_dict":
    sd}``, a bare state dict, or a known wrapper (module docstring), each wrapper noted
    in the log. ``meta`` holds the wrapper's other entries."""
    notes = []
    if isinstance(obj.get("state_dict"), dict):
        sd, meta = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
        if set(meta) - {"arch"}:
            notes.append(f'{{"state_dict": ...}} with {", ".join(sorted(map(str, meta))[:6])}')
    elif isinstance(obj.get("model"), dict):  # a state dict's values are tensors, not dicts
        sd, meta = obj["model"], {k: v for k, v in obj.items() if k != "model"}
        notes.append('{"model": ...}')
    else:
        sd, meta = obj, {}
    for prefix in WRAPPER_PREFIXES:
        stripped = _strip_common_prefix(sd, prefix)
        if stripped is not None:
            sd = stripped
            notes.append(
                f"every key under {prefix!r}" + (" (DataParallel/DDP)" if prefix == "module." else " (Lightning)")
            )
    if notes:
        log.info("%s: a wrapped checkpoint (%s); using the state dict inside", path, "; ".join(notes))
    return sd, meta


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return ``(state_dict, meta)``; ``meta`` holds the wrapper's other entries."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle with code, not a torch file
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    sd, meta = unwrap_state(obj, path)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    return sd, meta


def align_state_from(sd: dict) -> dict:
    """The recall model's state dict inside ``sd``: a ranker checkpoint's
    ``align_model.`` copy (the ranker head left out), or ``sd`` itself."""
    if any(k.startswith(ALIGN_PREFIX) for k in sd):
        return {k[len(ALIGN_PREFIX) :]: v for k, v in sd.items() if k.startswith(ALIGN_PREFIX)}
    return sd


def load_state(
    model: torch.nn.Module,
    sd: dict,
    source: str,
    prefix: str = "",
    benign=None,
    hint: str | None = None,
    assign: bool = False,
) -> list[str]:
    """Strictly load ``sd`` into ``model``; returns the benign keys it ignored.

    ``assign``: the model takes ``sd``'s tensors instead of copying them (no copy of the
    weights; only for tensors nothing else holds, e.g. just read from a file).

    ``prefix`` is where the recall model sits (``"align_model."`` in the ranker), so
    the benign extras are recognised there too. ``benign`` replaces the recall
    model's list of tolerated extra keys (other models, e.g. ``models.taiyi``);
    ``hint`` replaces the closing line of the error message.
    """
    expected = model.state_dict()
    benign = {prefix + k for k in (BENIGN_EXTRAS if benign is None else benign)}
    ignored = sorted(k for k in sd if k not in expected and k in benign)
    unexpected = sorted(k for k in sd if k not in expected and k not in benign)
    missing = sorted(k for k in expected if k not in sd)
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    )
    if unexpected or missing or shapes:
        parts = [f"{source} does not match {type(model).__name__}:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                shown = keys[:40] + ([f"... and {len(keys) - 40} more"] if len(keys) > 40 else [])
                parts.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        parts.append(
            hint if hint is not None else "  (a smaller or larger variant needs its architecture: --arch FILE.json)"
        )
        raise CheckpointError("\n".join(parts))
    if ignored:
        log.info("%s: ignored %d tensors that inference does not use: %s", source, len(ignored), ", ".join(ignored))
    keep = {k: v for k, v in sd.items() if k in expected}
    if assign:  # the model's dtypes stay (a half-precision file is cast, as a copy would)
        keep = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in keep.items()}
    model.load_state_dict(keep, strict=True, assign=assign)
    return ignored


def _arch_for(path: str, meta: dict, arch) -> AlignArch:
    if isinstance(arch, AlignArch):
        return arch
    if arch:  # a JSON file given on the command line
        return AlignArch.from_json(arch)
    if "arch" in meta:
        try:
            return AlignArch.from_dict(meta["arch"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its recorded architecture is not valid ({e})") from None
    sidecar = str(path) + ".arch.json"
    if os.path.isfile(sidecar):
        return AlignArch.from_json(sidecar)
    return AlignArch()


def load_align_model(path, bert_dir, arch=None, device="cpu") -> AlignModel:
    """Recall model from ``align_model.pth`` (wrapper or bare state dict), in eval mode.

    A ranker checkpoint is accepted too: its ``align_model.`` copy is used. The model is
    built without random initialisation and takes the file's tensors as they are read
    (every weight comes from the file: the strict check guarantees it).
    """
    sd, meta = read_checkpoint(path)
    sd = align_state_from(sd)
    with skip_init():
        model = AlignModel.from_bert_dir(bert_dir, _arch_for(str(path), meta, arch))
    load_state(model, sd, str(path), assign=True)
    return model.to(device).eval()


def load_ranker(path, bert_dir, arch=None, align_checkpoint=None, device="cpu") -> SiameseRanker:
    """Ranker with its own copy of the recall model restored from the same file;
    ``align_checkpoint`` then replaces that copy with another recall checkpoint."""
    sd, meta = read_checkpoint(path)
    with skip_init():
        align = AlignModel.from_bert_dir(bert_dir, _arch_for(str(path), meta, arch))
        model = SiameseRanker(align)
    load_state(model, sd, str(path), prefix=ALIGN_PREFIX, assign=True)
    if align_checkpoint:
        asd, _ = read_checkpoint(align_checkpoint)
        load_state(model.align_model, align_state_from(asd), str(align_checkpoint), assign=True)
    return model.to(device).eval()


def _atomic_save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_align_checkpoint(model: AlignModel, path) -> None:
    """Authors' format ``{"state_dict": ...}``; a non-default arch is recorded too."""
    obj = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if not model.arch.is_default:
        obj["arch"] = model.arch.to_dict()
    _atomic_save(obj, str(path))


def save_ranker_checkpoint(model: SiameseRanker, path) -> None:
    """Authors' format: a bare state dict; a non-default arch goes to a sidecar."""
    _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, str(path))
    sidecar = str(path) + ".arch.json"
    if not model.align_model.arch.is_default:
        write_json(sidecar, model.align_model.arch.to_dict(), indent=None)
    elif os.path.exists(sidecar):
        os.remove(sidecar)
