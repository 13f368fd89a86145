"""download_assets.py / utils.assets against a local HTTP mirror on 127.0.0.1.

Covers: mirror layout, sha256 verification (manifest and recorded), skip without any
request when present and verified, unknown sha256 recorded and printed, HTTP Range
resume (pre-seeded partial file, body cut mid-way, server answering 200 instead of
206), checksum mismatch kept aside, no-network and disk-full messages, and the
Hugging Face path in offline mode with a pre-populated cache (subprocess, no hub).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from local_server import Fault, LocalServer

import download_assets
from utils.fetch import assets as A
from utils.io import PartFile

ROOT = Path(__file__).resolve().parent.parent


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


BIG = b"PK\x03\x04" + os.urandom(300_000)  # a "large" asset (a torch zip by its magic): several chunks
CSV = "1,红山,http://x/1.jpg,1,10,10,\n".encode()
TRAIN = (
    "$record$".join(["7", "http://x/a.jpg", "http://x/b.jpg", "0.1", "0.2", "标题", "类目", "", "", "西湖"]).encode()
    + b"\n"
)  # one ranking record
VOCAB = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n红\n".encode()


def write_manifest(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"assets": entries}), encoding="utf-8")
    return path


@pytest.fixture
def world(tmp_path):
    """A mirror with three assets (one of unknown sha256) and a manifest for it."""
    srv = LocalServer().start()
    srv.add("/data/r.csv", CSV)
    srv.add("/assets/weights/align_model.pth", BIG)
    srv.add("/assets/bert/vocab.txt", VOCAB)
    manifest = write_manifest(
        tmp_path / "m.json",
        [
            {"name": "recall_csv", "url": "https://example.invalid/r.csv", "path": "data/r.csv", "sha256": sha(CSV)},
            {
                "name": "align_weights",
                "url": "https://example.invalid/w.pth",
                "path": "assets/weights/align_model.pth",
                "sha256": None,
            },
            {
                "name": "bert_vocab",
                "hf": {"repo_id": "google-bert/bert-base-chinese", "filename": "vocab.txt"},
                "path": "assets/bert/vocab.txt",
                "sha256": sha(VOCAB),
            },
            {
                "name": "train_csv",
                "url": "https://example.invalid/t.csv",
                "path": "data/t.csv",
                "sha256": None,
                "default": False,
            },
        ],
    )
    yield srv, manifest, tmp_path / "dest"
    srv.stop()


def run(manifest, dest, *extra) -> int:
    return download_assets.main(
        ["--manifest", str(manifest), "--dest", str(dest), "--no-progress", "--retries", "0", *extra]
    )


def test_mirror_download_then_skip_without_requests(world, capsys):
    srv, manifest, dest = world
    assert run(manifest, dest, "--mirror", srv.base_url) == 0
    assert (dest / "data/r.csv").read_bytes() == CSV
    assert (dest / "assets/weights/align_model.pth").read_bytes() == BIG
    assert (dest / "assets/bert/vocab.txt").read_bytes() == VOCAB  # hf asset from the mirror
    assert not (dest / "data/t.csv").exists()  # not in the default set
    out = capsys.readouterr().out
    # the unknown sha256 is printed and recorded
    assert f"align_weights: sha256 {sha(BIG)}" in out
    rec = json.loads((dest / A.HASHES_FILE).read_text())["assets"]
    assert rec["align_weights"]["sha256"] == sha(BIG)
    assert rec["align_weights"]["manifest_sha256"] is None
    assert not list(dest.rglob("*.part*"))

    srv.reset_counts()
    assert run(manifest, dest, "--mirror", srv.base_url) == 0
    assert srv.total_requests == 0
    assert "0 downloaded, 3 already present and verified" in capsys.readouterr().out

    # --only a non-default asset
    srv.add("/data/t.csv", TRAIN)
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "train_csv") == 0
    assert srv.log == [("GET", "/data/t.csv", None)]


def test_changed_file_is_rehashed_and_replaced(world, capsys):
    srv, manifest, dest = world
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "recall_csv") == 0
    (dest / "data/r.csv").write_bytes(b"edited by hand\n")
    srv.reset_counts()
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "recall_csv") == 0
    assert srv.count("/data/r.csv") == 1
    assert (dest / "data/r.csv").read_bytes() == CSV


def test_resume_from_preseeded_partial_file(world):
    srv, manifest, dest = world
    half = len(BIG) // 2
    part = dest / "assets/weights/align_model.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BIG[:half])
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "align_weights") == 0
    assert srv.log == [("GET", "/assets/weights/align_model.pth", f"bytes={half}-")]
    assert (dest / "assets/weights/align_model.pth").read_bytes() == BIG
    assert not part.exists()


def test_resume_after_body_cut_midway(world):
    srv, manifest, dest = world
    half = len(BIG) // 3
    srv.add("/assets/weights/align_model.pth", BIG, faults=[Fault(truncate=half)])
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "align_weights") == 0
    ranges = [r for (_, p, r) in srv.log if p == "/assets/weights/align_model.pth"]
    assert ranges[0] is None and len(ranges) == 2
    start = int(ranges[1].split("=")[1].rstrip("-"))
    assert 0 < start <= half  # only the remainder was requested
    assert (dest / "assets/weights/align_model.pth").read_bytes() == BIG


def test_changed_file_on_server_restarts_on_200(world):
    srv, manifest, dest = world
    part = dest / "assets/weights/align_model.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # a partial download of an older version
    url = srv.url("/assets/weights/align_model.pth")
    Path(str(part) + ".json").write_text(json.dumps({"url": url, "etag": '"old-version"'}))
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "align_weights") == 0
    assert srv.log == [("GET", "/assets/weights/align_model.pth", "bytes=1000-")]
    assert (dest / "assets/weights/align_model.pth").read_bytes() == BIG  # not appended


def test_checksum_mismatch_is_kept_aside(world, capsys):
    srv, manifest, dest = world
    srv.add("/data/r.csv", b"not the published file\n")
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "recall_csv") == 1
    err = capsys.readouterr().err
    assert "recall_csv: checksum mismatch" in err and sha(CSV) in err
    assert not (dest / "data/r.csv").exists()
    assert (dest / "data/r.csv.bad-sha256").read_bytes() == b"not the published file\n"


def test_recorded_sha_pins_an_unknown_asset(world, capsys):
    srv, manifest, dest = world
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "align_weights") == 0
    (dest / "assets/weights/align_model.pth").unlink()
    srv.add("/assets/weights/align_model.pth", b"another version")
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "align_weights") == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and A.HASHES_FILE in err and sha(BIG) in err


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_message(world, capsys):
    _, manifest, dest = world
    port = _closed_port()
    m = write_manifest(
        dest.parent / "m2.json",
        [
            {"name": "a", "url": f"http://127.0.0.1:{port}/a.csv", "path": "data/a.csv", "sha256": None},
            {"name": "b", "url": f"http://127.0.0.1:{port}/b.csv", "path": "data/b.csv", "sha256": None},
        ],
    )
    assert run(m, dest) == 1
    err = capsys.readouterr().err
    assert f"cannot reach 127.0.0.1:{port}: check the network or use --mirror" in err
    assert f"b: not tried: 127.0.0.1:{port} was unreachable" in err
    assert not (dest / "data/a.csv").exists()


def test_an_unreachable_hugging_face_endpoint_is_not_tried_again(world, capsys, monkeypatch, tmp_path):
    """Hugging Face files are requested from HF_ENDPOINT: once it is found unreachable, the
    next hf asset is not tried (the host is the endpoint's, not the repository owner's)."""
    import huggingface_hub.constants

    _, _, dest = world
    port = _closed_port()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hf = {"repo_id": "google-bert/bert-base-chinese"}
    m = write_manifest(
        dest.parent / "m3.json",
        [
            {"name": "vocab", "hf": {**hf, "filename": "vocab.txt"}, "path": "bert/vocab.txt", "sha256": None},
            {"name": "config", "hf": {**hf, "filename": "config.json"}, "path": "bert/config.json", "sha256": None},
        ],
    )
    assert run(m, dest) == 1
    err = capsys.readouterr().err
    assert f"cannot reach 127.0.0.1:{port}" in err
    assert f"config: not tried: 127.0.0.1:{port} was unreachable" in err


def test_disk_full_message(world, capsys, monkeypatch):
    srv, manifest, dest = world

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_init = PartFile.__init__

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        self.file = FullDisk(self.file)

    monkeypatch.setattr(PartFile, "__init__", init)
    assert run(manifest, dest, "--mirror", srv.base_url, "--only", "align_weights") == 1
    err = capsys.readouterr().err
    assert "align_weights: disk full while writing" in err
    assert "align_model.pth.part" in err and "MB free on that disk" in err


def test_bad_manifest_and_unknown_name(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"assets": [{"name": "x", "path": "../up.csv", "url": "http://a/b"}]}')
    assert download_assets.main(["--manifest", str(bad), "--dest", str(tmp_path)]) == 2
    assert "stay inside the destination" in capsys.readouterr().err
    assert download_assets.main(["--dest", str(tmp_path), "--only", "nope"]) == 2
    assert "unknown asset name(s): nope" in capsys.readouterr().err


def test_project_manifest_is_complete():
    assets = {a.name: a for a in A.load_manifest(A.DEFAULT_MANIFEST)}
    assert set(assets) == {
        "recall_csv",
        "rank_val_csv",
        "train_csv",
        "poi_pic_num",
        "poi_image_vectors",
        "poi_name_vectors",
        "align_weights",
        "ranker_weights",
        "bert_vocab",
        "bert_config",
        # the Taiyi-CLIP baseline (download_assets.py --with-baselines)
        "taiyi_text_config",
        "taiyi_text_vocab",
        "taiyi_text_tokenizer_config",
        "taiyi_text_special_tokens",
        "taiyi_text_finetuned",
        "taiyi_text_weights",
        "clip_config",
        "clip_preprocessor_config",
        "clip_weights",
    }
    assert assets["align_weights"].path.endswith("/align_model.pth")
    assert not assets["train_csv"].default
    assert assets["bert_vocab"].hf["repo_id"] == "google-bert/bert-base-chinese"
    assert assets["recall_csv"].sha256.startswith("c51402c4")


def test_hf_offline_with_prepopulated_cache(tmp_path):
    """HF_HOME + HF_HUB_OFFLINE=1: hf_hub_download serves from the cache, no hub access."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--google-bert--bert-base-chinese"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "vocab.txt").write_bytes(VOCAB)
    (snap / "config.json").write_text('{"model_type": "bert"}')
    m = write_manifest(
        tmp_path / "m.json",
        [
            {
                "name": "bert_vocab",
                "hf": {"repo_id": "google-bert/bert-base-chinese", "filename": "vocab.txt"},
                "path": "assets/bert-base-chinese/vocab.txt",
                "sha256": sha(VOCAB),
            },
            {
                "name": "bert_config",
                "hf": {"repo_id": "google-bert/bert-base-chinese", "filename": "config.json"},
                "path": "assets/bert-base-chinese/config.json",
                "sha256": None,
            },
        ],
    )
    env = dict(
        os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"
    )  # would fail loudly if it were contacted
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    cmd = [
        sys.executable,
        str(ROOT / "download_assets.py"),
        "--manifest",
        str(m),
        "--dest",
        str(tmp_path / "d"),
        "--no-progress",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "d" / "assets" / "bert-base-chinese"
    assert (dest / "vocab.txt").read_bytes() == VOCAB
    assert (dest / "config.json").read_text() == '{"model_type": "bert"}'
    assert "bert_config: sha256 " in r.stdout
    rec = json.loads((tmp_path / "d" / A.HASHES_FILE).read_text())["assets"]
    assert rec["bert_vocab"]["source"].startswith("hf://google-bert/bert-base-chinese/vocab.txt")

    # an empty cache in offline mode: a clear message, nothing written
    env["HF_HOME"] = str(tmp_path / "empty")
    r = subprocess.run(
        cmd[:-3] + ["--dest", str(tmp_path / "d2"), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 1
    assert "not in the Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert not (tmp_path / "d2" / "assets").exists() or not list((tmp_path / "d2").rglob("*.txt"))
