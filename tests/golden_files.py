"""Golden files of tests/test_golden.py: record, normalise, compare (a helper, not a test).

``Golden.check(name, produced)`` compares an output file with ``tests/golden/<name>``,
or writes it there when ``AVAS_GOLDEN_RECORD=1`` (a name checked twice in one recording
session is written once and then compared, so reruns that must agree are checked too).

What is compared, by suffix:
  .json   parsed, after ``normalise`` (the ONE normalisation: keys in ``RUN_KEYS`` dropped,
          temporary paths and the test server's address replaced by placeholders);
  .jsonl  the normalised records as a sorted list (download_images.py writes its
          manifest in the order the downloads finish);
  .npz    keys and arrays (same dtype, equal values), not the zip bytes (timestamps);
  .npy    a pickled dict of arrays (the published POI-table format), likewise;
  other   text, byte for byte once the placeholders are in (CSV floats as written).

Machine dependence: ``ENV.json`` (written when recording) holds what the floating-point
bits depend on. Where the running environment differs, numbers (CSV cells, JSON values,
float arrays) are compared within ``TOL`` and ``MACHINE_KEYS`` are left out; everything
else stays exact, and a warning says so and why.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = os.environ.get("AVAS_GOLDEN_RECORD") == "1"
TOL = 1e-5
# What differs between two runs of one command on one machine (clocks, and whether the
# ONNX export was already in its cache, which depends on the runs before): always dropped.
RUN_KEYS = frozenset(
    {"timings_s", "seconds", "images_per_s", "items_per_s", "onnx_setup_s", "onnx_exported", "mtime_ns"}
)
# What depends on the environment rather than the code (how the cores were shared; the
# ONNX export's file name, keyed by the torch version): exact only in ENV.json's environment.
MACHINE_KEYS = frozenset({"lanes", "onnx_threads", "num_workers", "onnx_file"})


def environment() -> dict:
    import onnxruntime
    import PIL
    import torch

    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": len(os.sched_getaffinity(0)),
    }


def normalise(obj, subs: dict, drop=RUN_KEYS):
    if isinstance(obj, dict):
        return {k: normalise(v, subs, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [normalise(v, subs, drop) for v in obj]
    return substitute(obj, subs) if isinstance(obj, str) else obj


def substitute(text: str, subs: dict) -> str:
    for real in sorted(subs, key=len, reverse=True):
        text = text.replace(real, subs[real])
    return text


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def first_difference(got, want, exact: bool, where: str = "") -> str | None:
    """Where ``got`` and ``want`` first differ (None when they agree)."""
    if isinstance(got, dict) and isinstance(want, dict):
        if list(got) != list(want):
            return f"{where or '/'}: keys {sorted(set(got) ^ set(want)) or list(got)}, recorded {list(want)}"
        return next(filter(None, (first_difference(got[k], want[k], exact, f"{where}/{k}") for k in got)), None)
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return f"{where or '/'}: {len(got)} entries, recorded {len(want)}"
        return next(
            filter(None, (first_difference(g, w, exact, f"{where}[{i}]") for i, (g, w) in enumerate(zip(got, want)))),
            None,
        )
    if isinstance(got, np.ndarray) and isinstance(want, np.ndarray):
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{where}: {got.dtype}{got.shape}, recorded {want.dtype}{want.shape}"
        tolerant = not exact and got.dtype.kind == "f"
        if np.array_equal(got, want) or (tolerant and np.allclose(got, want, rtol=0, atol=TOL)):
            return None
        i = tuple(int(x) for x in np.argwhere(~np.isclose(got, want, rtol=0, atol=TOL) if tolerant else got != want)[0])
        return f"{where}{list(i)}: {got[i].item()!r}, recorded {want[i].item()!r}"
    if not exact and _is_number(got) and _is_number(want):
        return None if abs(got - want) <= TOL else f"{where}: {got!r}, recorded {want!r} (tolerance {TOL})"
    if type(got) is type(want) and got == want:
        return None
    return f"{where}: {got!r}, recorded {want!r}"


def _cells(line: str) -> list:
    """A CSV line as values: numbers where a cell reads as one (tolerant comparison)."""

    def value(cell):
        try:
            return float(cell)
        except ValueError:
            return cell

    return [value(c) for c in next(csv.reader([line]), [])]


def text_difference(got: str, want: str, exact: bool) -> str | None:
    if got == want:
        return None
    g, w = got.splitlines(keepends=True), want.splitlines(keepends=True)
    for i, (a, b) in enumerate(zip(g, w), 1):
        if a != b and (exact or a.endswith("\n") != b.endswith("\n") or first_difference(_cells(a), _cells(b), exact)):
            return f"line {i}: {a!r}\n    recorded: {b!r}"
    return None if len(g) == len(w) else f"{len(g)} lines, recorded {len(w)}"


def load_arrays(path: Path) -> dict:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    table = np.load(path, allow_pickle=True).item()  # a pickled dict this test suite wrote
    return {k: np.asarray(v) for k, v in table.items()}


class Golden:
    """The golden files of outputs written under ``folder`` (its path -> ``<work>``)."""

    def __init__(self, folder: Path):
        self.subs = {str(folder): "<work>", str(folder.resolve()): "<work>"}
        self.written: set[str] = set()
        env, env_file = environment(), GOLDEN / "ENV.json"
        if RECORD:
            env_file.parent.mkdir(parents=True, exist_ok=True)
            env_file.write_text(json.dumps(env, indent=1) + "\n", encoding="utf-8")
        elif not env_file.is_file():
            raise AssertionError(f"{env_file} missing: record with AVAS_GOLDEN_RECORD=1")
        recorded = json.loads(env_file.read_text(encoding="utf-8"))
        self.differs = {k: (recorded.get(k), v) for k, v in env.items() if recorded.get(k) != v}
        self.exact = not self.differs
        if self.differs:
            warnings.warn(
                "golden files compared in tolerant mode (numbers within "
                f"{TOL}, {sorted(MACHINE_KEYS)} left out): this environment differs "
                "from tests/golden/ENV.json in "
                + ", ".join(f"{k} {v!r} (recorded {r!r})" for k, (r, v) in self.differs.items()),
                stacklevel=2,
            )

    def comparable(self, path: Path, subs: dict):
        """The file as compared: text, normalised JSON (records), or arrays."""
        if path.suffix in (".npz", ".npy"):
            return load_arrays(path)
        text = path.read_bytes().decode("utf-8")  # no newline translation: CSV line ends count
        drop = RUN_KEYS if self.exact else RUN_KEYS | MACHINE_KEYS
        if path.suffix == ".json":
            return normalise(json.loads(text), subs, drop)
        if path.suffix == ".jsonl":
            return sorted(
                (normalise(json.loads(ln), subs, drop) for ln in text.splitlines()),
                key=lambda r: json.dumps(r, sort_keys=True),
            )
        return substitute(text, subs)

    def check(self, name: str, produced, subs: dict | None = None) -> None:
        produced, want = Path(produced), GOLDEN / name
        subs = {**self.subs, **(subs or {})}
        if RECORD and name not in self.written:
            self.written.add(name)
            want.parent.mkdir(parents=True, exist_ok=True)
            got = self.comparable(produced, subs)
            if isinstance(got, str):
                want.write_bytes(got.encode("utf-8"))
            elif produced.suffix == ".json":
                want.write_text(json.dumps(got, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            elif produced.suffix == ".jsonl":
                want.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in got), encoding="utf-8")
            else:
                shutil.copyfile(produced, want)
        assert want.is_file(), f"{want} missing: record with AVAS_GOLDEN_RECORD=1"
        got = self.comparable(produced, subs)
        recorded = self.comparable(want, {})
        diff = (
            text_difference(got, recorded, self.exact)
            if isinstance(got, str)
            else first_difference(got, recorded, self.exact)
        )
        assert diff is None, f"{name} differs from the recorded output ({produced}): {diff}"
