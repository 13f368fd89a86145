"""The one checkpoint reader and writer. Released formats (SPEC 2, 5): ``align_model.pth`` =
``{"state_dict": sd}``; the ranker's, a bare state dict with the recall model under ``align_model.``;
``.safetensors`` too. Reading: weights-only, wrappers unwrapped, then strict: keys, shapes, finiteness."""

from __future__ import annotations

from utils.cli import UserError

import json
import logging
import os
from dataclasses import asdict

import torch

from utils.io import atomic_path, write_json

from .align import AlignArch, AlignModel
from .ranker import SiameseRanker

log = logging.getLogger(__name__)

RELATION_HEAD = ("relations_emb.weight", "linear_relation.weight", "linear_relation.bias")  # unused by inference
BENIGN_EXTRAS = ("text_model.embeddings.position_ids", *RELATION_HEAD)  # tolerated in the released checkpoints
ALIGN_PREFIX = "align_model."  # where the ranker keeps its copy of the recall model
WRAPPER_PREFIXES = {"module.": "DataParallel/DDP", "model.": "Lightning"}
SAFETENSORS = ".safetensors"
MAX_LISTED = 40  # keys listed per kind of mismatch


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not match the model."""


def unwrap_state(obj: dict, path: str) -> tuple[dict, dict]:
    """``(state_dict, other entries)`` of a wrapped checkpoint; a key prefix is stripped only when EVERY key has it."""
    notes, sd, meta = [], obj, {}
    for key in ("state_dict", "model"):  # a state dict's values are tensors, not dicts
        if isinstance(obj.get(key), dict):
            sd, meta = obj[key], {k: v for k, v in obj.items() if k != key}
            if key == "model" or set(meta) - {"arch"}:
                extras = f" with {', '.join(sorted(map(str, meta))[:6])}" if meta else ""
                notes.append(f'{{"{key}": ...}}{extras}')
            break
    for prefix, what in WRAPPER_PREFIXES.items():
        if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
            notes.append(f"every key under {prefix!r} ({what})")
    if notes:
        log.info("%s: a wrapped checkpoint (%s); using the state dict inside", path, "; ".join(notes))
    return sd, meta


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a torch or ``.safetensors`` checkpoint (``meta``: e.g. the recorded ``arch``)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.endswith(SAFETENSORS):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
            if "arch" in meta:
                meta["arch"] = json.loads(meta["arch"])
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
        return sd, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle with code, not a torch file
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({why})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    sd, meta = unwrap_state(obj, path)
    if bad := [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    return sd, meta


def align_state_from(sd: dict) -> dict:
    """The recall model inside ``sd``: a ranker checkpoint's ``align_model.`` copy, or ``sd`` itself."""
    if any(k.startswith(ALIGN_PREFIX) for k in sd):
        return {k[len(ALIGN_PREFIX) :]: v for k, v in sd.items() if k.startswith(ALIGN_PREFIX)}
    return sd


def load_state(model: torch.nn.Module, sd: dict, source: str, prefix: str = "", benign=None, hint=None) -> list[str]:
    """Strictly load ``sd`` into ``model`` (which takes its tensors); returns the ignored ``benign`` keys
    (under ``prefix``; default: the recall model's). ``hint``: the error's last line."""
    expected = model.state_dict()
    benign = {prefix + k for k in (BENIGN_EXTRAS if benign is None else benign)}
    problems = {
        "missing keys": [k for k in expected if k not in sd],
        "unexpected keys": [k for k in sd if k not in expected and k not in benign],
        "shape mismatches": [
            f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in sd and sd[k].shape != v.shape
        ],
    }
    if any(problems.values()):
        parts = [f"{source} does not match {type(model).__name__}:"]
        for title, keys in problems.items():
            if keys := sorted(keys):
                more = [f"... and {len(keys) - MAX_LISTED} more"] if len(keys) > MAX_LISTED else []
                parts.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:MAX_LISTED] + more))
        parts.append(hint or "  (a smaller or larger variant needs its architecture: --arch FILE.json)")
        raise CheckpointError("\n".join(parts))
    keep = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in sd.items() if k in expected}
    # NaN and inf propagate into a sum: a finite sum clears a tensor 8x faster than the elementwise test, which
    # only a sum that overflows (or a bad value) needs; 0.17 s of every start-up on the full-size model
    floats = ((k, v) for k, v in keep.items() if v.is_floating_point() and not torch.isfinite(v.sum()))
    if bad := next((k for k, v in floats if not torch.isfinite(v).all()), None):
        raise CheckpointError(f"{source}: tensor {bad} holds NaN or infinite values")
    ignored = sorted(k for k in sd if k not in expected)
    if ignored:
        log.info("%s: ignored %d tensors that inference does not use: %s", source, len(ignored), ", ".join(ignored))
    model.load_state_dict(keep, strict=True, assign=True)
    return ignored


def recorded_arch(path: str, meta: dict) -> dict | None:
    """The architecture a checkpoint records (wrapper or metadata, else its sidecar), or None."""
    if "arch" in meta:
        return meta["arch"]
    sidecar = str(path) + ".arch.json"
    return asdict(AlignArch.from_json(sidecar)) if os.path.isfile(sidecar) else None


def _empty_for(path, bert_dir, arch, head=None) -> tuple[dict, torch.nn.Module]:
    """``(state dict of path, an empty AlignModel in head)`` of ``arch`` (or its JSON file), else the recorded one."""
    sd, meta = read_checkpoint(path)
    if arch and not isinstance(arch, AlignArch):
        arch = AlignArch.from_json(arch)  # its errors name the JSON file, not the checkpoint
    elif not arch:
        try:
            arch = AlignArch.from_dict(recorded_arch(str(path), meta))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its recorded architecture is not valid ({e})") from None
    with torch.device("meta"):  # no memory taken nor random numbers drawn: load_state assigns the tensors
        model = AlignModel.from_bert_dir(bert_dir, arch)
        return sd, head(model) if head else model


def load_align_model(path, bert_dir, arch=None, device="cpu") -> AlignModel:
    """Recall model (in eval mode) from ``align_model.pth`` or a ranker checkpoint's copy."""
    sd, model = _empty_for(path, bert_dir, arch)
    load_state(model, align_state_from(sd), str(path))
    return model.to(device).eval()


def load_ranker(path, bert_dir, arch=None, align_checkpoint=None, device="cpu") -> SiameseRanker:
    """Ranker (in eval mode) with its own copy of the recall model, or the one of ``align_checkpoint``."""
    sd, model = _empty_for(path, bert_dir, arch, SiameseRanker)
    load_state(model, sd, str(path), prefix=ALIGN_PREFIX)
    if align_checkpoint:
        asd, _ = read_checkpoint(align_checkpoint)
        load_state(model.align_model, align_state_from(asd), str(align_checkpoint))
    return model.to(device).eval()


def save_align_checkpoint(model: AlignModel, path) -> None:
    """Authors' format ``{"state_dict": ...}``; a non-default arch is recorded too."""
    obj = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
    if not model.arch.is_default:
        obj["arch"] = asdict(model.arch)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_ranker_checkpoint(model: SiameseRanker, path) -> None:
    """Authors' format: a bare state dict; a non-default arch goes to a sidecar."""
    with atomic_path(path) as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    sidecar = str(path) + ".arch.json"
    if not model.align_model.arch.is_default:
        write_json(sidecar, asdict(model.align_model.arch), indent=None)
    elif os.path.exists(sidecar):
        os.remove(sidecar)


def convert_to_safetensors(src, dst) -> dict:
    """Write checkpoint ``src`` as ``.safetensors`` ``dst``, its recorded architecture in the metadata."""
    from safetensors.torch import save_file

    if not str(dst).endswith(SAFETENSORS):
        raise CheckpointError(f"{dst}: the output must end in {SAFETENSORS}")
    sd, meta = read_checkpoint(src)
    arch = recorded_arch(str(src), meta)
    tensors = {k: v.detach().clone().contiguous() for k, v in sd.items()}  # safetensors refuses shared memory
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata={"arch": json.dumps(arch)} if arch else None)
    return {"tensors": len(tensors), "values": sum(v.numel() for v in tensors.values()), "arch": arch}
