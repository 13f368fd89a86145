"""download_images.py / utils.download against a local HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

from local_server import PROXY_VARS, Fault, LocalServer  # noqa: E402

import download_images  # noqa: E402
from utils.args import Downloads  # noqa: E402
from utils.fetch.http import open_session  # noqa: E402
from utils.fetch.images import apply_url_map, parse_url_map, sniff_image_ext, verify_existing  # noqa: E402

# Short timeouts and backoff so the whole file runs in seconds. The read timeout (1 s)
# must stay below the server delays that are meant to time out (2 s, 3 s), and leaves a
# loaded machine time to answer an ordinary request.
FAST = [
    "--timeout-connect",
    "2",
    "--timeout-read",
    "1",
    "--retries",
    "2",
    "--backoff",
    "0.01",
    "--workers",
    "4",
    "--no-progress",
]
SEP = "$record$"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def make_image(fmt="JPEG", size=(48, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    # a little structure so JPEGs are not trivially small
    for x in range(0, size[0], 4):
        img.putpixel((x, x % size[1]), (x % 255, 90, 160))
    img.save(buf, fmt)
    return buf.getvalue()


def write_recall_csv(path: Path, rows) -> Path:
    """rows: (poi_id, rank, url) or a raw string line."""
    lines = []
    for r in rows:
        lines.append(r if isinstance(r, str) else f"{r[0]},景点{r[0]},{r[2]},{r[1]},10,10,")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rank_line(item, url_a, url_b, oss_a, oss_b, ctr=(1, 2)) -> str:
    return SEP.join([item, url_a, url_b, str(ctr[0]), str(ctr[1]), "标题", "类目", oss_a, oss_b, "西湖,灵隐寺"])


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def by_key(records):
    return {r["key"]: r for r in records if r["key"] is not None}


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def final_images(out: Path) -> dict[str, Path]:
    """stem -> path of every non-hidden, non-bookkeeping file in out."""
    files = {}
    for p in out.iterdir():
        if p.name.startswith(".") or p.name.startswith(("manifest", "download_images")):
            continue
        assert p.stem not in files, f"two files for one key: {p.name}, {files[p.stem].name}"
        files[p.stem] = p
    return files


def assert_no_bad_final_files(out: Path) -> None:
    for p in final_images(out).values():
        assert decodes(p), f"undecodable file under a final name: {p.name}"
        assert sniff_image_ext(p.read_bytes()[:16]) == p.suffix, p.name


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


pytestmark = pytest.mark.usefixtures("no_proxy_env")


# ---------------------------------------------------------------------------
# unit tests of utils.download
# ---------------------------------------------------------------------------
def test_sniff_image_ext():
    assert sniff_image_ext(make_image("JPEG")) == ".jpg"
    assert sniff_image_ext(make_image("PNG")) == ".png"
    assert sniff_image_ext(make_image("GIF")) == ".gif"
    assert sniff_image_ext(make_image("BMP")) == ".bmp"
    assert sniff_image_ext(make_image("TIFF")) == ".tif"
    assert sniff_image_ext(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == ".webp"
    assert sniff_image_ext(b"<!DOCTYPE html><html>") is None
    assert sniff_image_ext(b"") is None


def test_url_map_and_parse():
    pairs = parse_url_map(["http://a/x/=http://127.0.0.1:1/m/", "http://b/=http://c/?q=1"])
    assert pairs[1] == ("http://b/", "http://c/?q=1")  # split at the first '='
    assert apply_url_map("http://a/x/1.jpg", pairs) == "http://127.0.0.1:1/m/1.jpg"
    assert apply_url_map("http://z/1.jpg", pairs) == "http://z/1.jpg"
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_url_map(["no-equals-sign"])


def test_session_retry_configuration():
    s = open_session(Downloads(workers=32, retries=3, backoff=0.2))
    adapter = s.get_adapter("http://127.0.0.1/")
    r = adapter.max_retries
    assert (r.total, r.connect, r.read, r.status) == (3, 3, 3, 3)
    assert r.backoff_factor == 0.2 and r.respect_retry_after_header and not r.raise_on_status
    assert set(r.status_forcelist) == {429, 500, 502, 503, 504}
    assert "GET" in r.allowed_methods
    assert getattr(r, "backoff_jitter", 0.2) > 0
    assert adapter._pool_maxsize == 32


def test_session_uses_proxy_from_environment(server, monkeypatch):
    # the local server plays the proxy: nothing leaves 127.0.0.1
    server.add("/via-proxy.jpg", make_image("JPEG"))
    monkeypatch.setenv("HTTP_PROXY", server.base_url)
    s = open_session(Downloads(retries=0))
    r = s.get("http://images.example.invalid/via-proxy.jpg", timeout=5)
    assert r.status_code == 200 and server.log[-1][1] == "/via-proxy.jpg"
    assert server.count("/via-proxy.jpg") == 1


def test_verify_existing(tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(make_image("JPEG", (40, 30)))
    info = verify_existing(good)
    assert (info.width, info.height, info.bytes) == (40, 30, good.stat().st_size)
    assert info.sha256 == sha(good.read_bytes())
    cut = tmp_path / "b.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert verify_existing(cut) is None
    empty = tmp_path / "c.png"
    empty.write_bytes(b"")
    assert verify_existing(empty) is None
    assert verify_existing(good, max_bytes=10) is None
    assert verify_existing(tmp_path / "missing.jpg") is None


# ---------------------------------------------------------------------------
# the main scenario: every fault once, then resume
# ---------------------------------------------------------------------------
def test_faults_verify_manifest_and_resume(server, tmp_path, capsys):
    jpg, png = make_image("JPEG", (64, 48)), make_image("PNG", (30, 20), (10, 200, 10))
    recoverable = {  # path -> (body, route options)
        "/ok.jpg": (jpg, {}),
        "/ok.png": (png, {}),
        "/noext_jpeg": (jpg, {}),
        "/noext_png": (png, {}),
        "/misnamed.jpg": (png, {}),  # PNG bytes behind a .jpg URL
        "/flaky.jpg": (jpg, {"faults": [Fault(status=500), Fault(status=503)]}),
        "/busy.jpg": (jpg, {"faults": [Fault(status=429, headers={"Retry-After": "1"})]}),
        "/cut_once.jpg": (jpg, {"faults": [Fault(truncate=50)]}),
        "/slow_once.jpg": (jpg, {"faults": [Fault(delay=2.0)]}),
        "/redirect": (b"", {"redirect": "/ok.jpg"}),
    }
    permanent = {  # path -> (body, route options, expected error kind)
        "/missing.jpg": (jpg, {"status": 404}, "http_404"),
        "/always500.jpg": (jpg, {"status": 500}, "http_500"),
        "/truncated.jpg": (jpg, {"truncate": 100}, "truncated"),
        "/page.jpg": (b"<!DOCTYPE html><html><body>gone</body></html>", {"content_type": "text/html"}, "not_image"),
        "/slow.jpg": (jpg, {"delay": 3.0}, "timeout"),
        "/bad_jpeg.jpg": (jpg[: len(jpg) // 2], {}, "undecodable"),  # complete HTTP, broken JPEG
        "/forbidden.jpg": (jpg, {"status": 403}, "http_403"),
    }
    for path, (body, opts) in recoverable.items():
        server.add(path, body, **opts)
    for path, (body, opts, _) in permanent.items():
        server.add(path, body, **opts)

    rows, key_of = [], {}
    for i, path in enumerate(list(recoverable) + list(permanent)):
        rows.append(("100", str(i), server.url(path)))
        key_of[path] = f"100_{i}"
    rows.insert(3, "200,only,three")  # wrong field count -> line 4
    rows.append("300,景点300,,1,10,10,")  # empty URL -> last line
    csv_path = write_recall_csv(tmp_path / "recall.csv", rows)
    n_lines = len(rows)
    out = tmp_path / "out"

    t0 = time.monotonic()
    rc = download_images.main(["--csv", str(csv_path), "--out", str(out), *FAST, "--skip-bad-rows"])
    assert time.monotonic() - t0 < 20
    assert rc == 1  # failures > --max-failures 0
    err = capsys.readouterr()
    assert "recall.csv:4: bad row: expected 7 fields" in err.err
    assert f"recall.csv:{n_lines}: bad row: empty image_url" in err.err
    assert "ok 10, skipped 0, failed 9" in err.out
    assert "http_404 1" in err.out and "bad_row 2" in err.out

    # every recoverable image present, decodes, extension from the bytes
    files = final_images(out)
    assert_no_bad_final_files(out)
    for path, (body, _) in recoverable.items():
        p = files[key_of[path]]
        expect = sniff_image_ext((body or jpg)[:16])
        assert p.suffix == expect, (path, p.name)
        assert p.read_bytes() == (body or jpg)
    assert not any(key_of[p] in files for p in permanent)
    assert not list(out.glob(".*.part")), "temporary files left behind"

    # retry behaviour seen by the server
    assert server.count("/flaky.jpg") == 3
    assert server.count("/missing.jpg") == 1 and server.count("/forbidden.jpg") == 1  # no retry on 4xx
    assert server.count("/always500.jpg") == 3  # 1 + 2 retries
    t = server.times["/busy.jpg"]
    assert len(t) == 2 and t[1] - t[0] >= 0.9, "Retry-After: 1 not honoured"

    # manifest: one record per row, reasons for failures, facts for successes
    recs = read_manifest(out / "manifest.jsonl")
    assert len(recs) == n_lines
    keyed = by_key(recs)
    for path, (body, _) in recoverable.items():
        r = keyed[key_of[path]]
        body = body or jpg
        assert r["status"] == "ok" and r["http"] == 200, r
        assert r["url"] == server.url(path)
        assert r["sha256"] == sha(body) and r["bytes"] == len(body)
        with Image.open(io.BytesIO(body)) as im:
            assert (r["width"], r["height"]) == im.size
        assert r["line"] == next(i + 1 for i, row in enumerate(rows) if row[2:3] == (server.url(path),))
    assert keyed[key_of["/redirect"]]["final_url"] == server.url("/ok.jpg")
    for path, (_, _, kind) in permanent.items():
        r = keyed[key_of[path]]
        assert r["status"] == "failed" and r["error_kind"] == kind, r
        assert r["error"] and server.url(path) in r["error"]
    assert keyed[key_of["/missing.jpg"]]["http"] == 404
    bad = [r for r in recs if r["key"] is None]
    assert sorted(r["line"] for r in bad) == [4, n_lines]
    assert all(r["status"] == "failed" and r["error_kind"] == "bad_row" for r in bad)

    # a second run downloads nothing that is already there
    server.reset_counts()
    rc = download_images.main(
        ["--csv", str(csv_path), "--out", str(out), *FAST, "--max-failures", "9", "--skip-bad-rows"]
    )
    assert rc == 0
    assert all(server.count(p) == 0 for p in recoverable)
    assert (out / "manifest.jsonl.prev").exists()
    recs2 = by_key(read_manifest(out / "manifest.jsonl"))
    for path in recoverable:
        r2, r1 = recs2[key_of[path]], keyed[key_of[path]]
        assert r2["status"] == "skipped"
        assert (r2["sha256"], r2["bytes"], r2["width"], r2["height"]) == (
            r1["sha256"],
            r1["bytes"],
            r1["width"],
            r1["height"],
        )

    # an invalid existing file is replaced, a stray other-extension copy removed
    damaged = files[key_of["/ok.jpg"]]
    damaged.write_bytes(damaged.read_bytes()[:200])
    (out / (key_of["/ok.png"] + ".jpg")).write_bytes(b"junk")  # beside the valid .png
    server.reset_counts()
    rc = download_images.main(
        ["--csv", str(csv_path), "--out", str(out), *FAST, "--max-failures", "9", "--skip-bad-rows"]
    )
    assert rc == 0
    assert server.count("/ok.jpg") == 1 and server.count("/ok.png") == 0
    recs3 = by_key(read_manifest(out / "manifest.jsonl"))
    assert recs3[key_of["/ok.jpg"]]["status"] == "ok"
    assert recs3[key_of["/ok.png"]]["status"] == "skipped"
    assert_no_bad_final_files(out)


def test_max_bytes_cap(server, tmp_path):
    big = make_image("PNG", (200, 200))
    server.add("/big.png", big)
    server.add("/big_nolen.png", big)
    csv_path = write_recall_csv(tmp_path / "r.csv", [("1", "1", server.url("/big.png"))])
    out = tmp_path / "out"
    rc = download_images.main(["--csv", str(csv_path), "--out", str(out), *FAST, "--max-bytes", str(len(big) - 1)])
    assert rc == 1
    r = read_manifest(out / "manifest.jsonl")[0]
    assert r["status"] == "failed" and r["error_kind"] == "too_large"
    assert final_images(out) == {}
    # the run kept its lines out of the caller's handlers while it ran, and only then
    assert logging.getLogger("download_images").propagate


# ---------------------------------------------------------------------------
# ranking format
# ---------------------------------------------------------------------------
def test_rank_format_durable_first_then_original(server, tmp_path):
    a1, b1 = make_image("JPEG", (40, 40)), make_image("PNG", (20, 30))
    server.add("/oss/1a", a1)
    server.add("/oss/1b", b1)
    server.add("/orig/1a.jpg", a1)
    server.add("/oss/2a", b"", status=404)  # durable copy gone -> original
    server.add("/orig/2a.jpg", a1)
    server.add("/oss/2b", b1, status=500)  # durable copy broken -> original
    server.add("/orig/2b.png", b1)
    server.add("/oss/3a", b"", status=404)  # both gone
    server.add("/orig/3a.jpg", b"", status=404)
    server.add("/oss/3b", a1)
    u = server.url
    lines = [
        rank_line("1", u("/orig/1a.jpg"), u("/orig/1b.png"), u("/oss/1a"), u("/oss/1b")),
        rank_line("2", u("/orig/2a.jpg"), u("/orig/2b.png"), u("/oss/2a"), u("/oss/2b")),
        rank_line("3", u("/orig/3a.jpg"), u("/orig/3b.png"), u("/oss/3a"), u("/oss/3b")),
        SEP.join(["4", "x", "y"]),  # wrong field count
        rank_line("5", "", u("/orig/5b.png"), "", u("/oss/5b")),  # no URL for image a
    ]
    csv_path = tmp_path / "rank.csv"
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = download_images.main(["--csv", str(csv_path), "--out", str(out), *FAST, "--skip-bad-rows"])
    assert rc == 1
    files = final_images(out)
    assert sorted(p.name for p in files.values()) == ["1_a.jpg", "1_b.png", "2_a.jpg", "2_b.png", "3_b.jpg"]
    assert server.count("/orig/1a.jpg") == 0  # durable copy worked: original untouched
    recs = read_manifest(out / "manifest.jsonl")
    keyed = by_key(recs)
    assert keyed["2_a"]["url"] == u("/orig/2a.jpg") and keyed["2_a"]["tried"][0]["http"] == 404
    assert keyed["2_b"]["url"] == u("/orig/2b.png")
    assert keyed["3_a"]["status"] == "failed" and keyed["3_a"]["error_kind"] == "http_404"
    assert u("/oss/3a") in keyed["3_a"]["error"] and u("/orig/3a.jpg") in keyed["3_a"]["error"]
    assert all(keyed[k]["line"] == int(k[0]) for k in keyed)
    assert sorted(r["line"] for r in recs if r["key"] is None) == [4, 5]
    assert sum(r["status"] == "failed" for r in recs) == 3
    assert_no_bad_final_files(out)


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------
def test_shard_and_limit(server, tmp_path):
    rows = []
    for i in range(10):
        server.add(f"/img{i}", make_image("JPEG", (16 + i, 16)))
        rows.append(("7", str(i), server.url(f"/img{i}")))
    csv_path = write_recall_csv(tmp_path / "r.csv", rows)
    out = tmp_path / "out"
    seen = set()
    for i in range(3):
        rc = download_images.main(["--csv", str(csv_path), "--out", str(out), *FAST, "--shard", f"{i}/3"])
        assert rc == 0
        keys = {r["key"] for r in read_manifest(out / f"manifest.shard-{i}-of-3.jsonl")}
        assert keys and not keys & seen
        seen |= keys
    assert seen == {f"7_{i}" for i in range(10)}
    assert server.total_requests == 10

    out2 = tmp_path / "out2"
    rc = download_images.main(["--csv", str(csv_path), "--out", str(out2), *FAST, "--limit", "3"])
    assert rc == 0
    assert sorted(final_images(out2)) == ["7_0", "7_1", "7_2"]
    with pytest.raises(SystemExit):
        download_images.main(["--csv", str(csv_path), "--out", str(out2), "--shard", "3/3"])


def test_url_prefix_map(server, tmp_path):
    server.add("/mirror/a/1.jpg", make_image("JPEG"))
    server.add("/mirror/b/2.png", make_image("PNG"))
    # original hosts: a closed local port, never contacted once mapped
    rows = [("1", "1", "http://127.0.0.1:9/cdn/1.jpg"), ("1", "2", "http://127.0.0.1:9/img/2.png")]
    csv_path = write_recall_csv(tmp_path / "r.csv", rows)
    out = tmp_path / "out"
    rc = download_images.main(
        [
            "--csv",
            str(csv_path),
            "--out",
            str(out),
            *FAST,
            "--url-prefix-map",
            f"http://127.0.0.1:9/cdn/={server.url('/mirror/a/')}",
            "--url-prefix-map",
            f"http://127.0.0.1:9/img/={server.url('/mirror/b/')}",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in final_images(out).values()) == ["1_1.jpg", "1_2.png"]
    assert by_key(read_manifest(out / "manifest.jsonl"))["1_2"]["url"] == server.url("/mirror/b/2.png")


def test_max_side_downscales_on_save(server, tmp_path):
    server.add("/big.jpg", make_image("JPEG", (400, 300)))
    server.add("/big.png", make_image("PNG", (120, 240)))
    server.add("/small.jpg", make_image("JPEG", (50, 40)))
    rows = [
        ("1", "1", server.url("/big.jpg")),
        ("1", "2", server.url("/big.png")),
        ("1", "3", server.url("/small.jpg")),
    ]
    csv_path = write_recall_csv(tmp_path / "r.csv", rows)
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv_path), "--out", str(out), *FAST, "--max-side", "100"]) == 0
    files = final_images(out)
    sizes = {k: Image.open(p).size for k, p in files.items()}
    assert sizes == {"1_1": (100, 75), "1_2": (50, 100), "1_3": (50, 40)}
    assert files["1_1"].suffix == ".jpg" and files["1_2"].suffix == ".png"
    keyed = by_key(read_manifest(out / "manifest.jsonl"))
    assert keyed["1_1"]["resized_from"] == [400, 300] and keyed["1_3"]["resized_from"] is None
    assert keyed["1_1"]["sha256"] == sha(files["1_1"].read_bytes())
    assert (keyed["1_1"]["width"], keyed["1_1"]["height"]) == (100, 75)


def test_unreadable_csv_is_a_clear_error(tmp_path, capsys):
    rc = download_images.main(["--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "nope.csv" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# crash safety: SIGKILL part-way, then resume
# ---------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_rerun_completes(tmp_path):
    n = 16
    bodies = {f"/k{i}": make_image("PNG" if i % 3 == 0 else "JPEG", (180 + i, 160)) for i in range(n)}
    # a slow body: SIGKILL lands while files are being written
    with LocalServer(drip=(2048, 0.03)) as srv:
        for path, body in bodies.items():
            srv.add(path, body)
        rows = [("9", str(i), srv.url(f"/k{i}")) for i in range(n)]
        csv_path = write_recall_csv(tmp_path / "r.csv", rows)
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "download_images.py"),
                "--csv",
                str(csv_path),
                "--out",
                str(out),
                *FAST,
                "--workers",
                "3",
            ],
            cwd=str(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS},
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done = [p for p in out.glob("9_*")] if out.exists() else []
                if len(done) >= 3:
                    break
                assert proc.poll() is None, "downloader ended before it could be killed"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=10)
        before = final_images(out)
        assert 3 <= len(before) < n, "kill did not land part-way"
        assert_no_bad_final_files(out)  # nothing partial under a final name, even now

        srv.drip = None
        srv.reset_counts()
        rc = download_images.main(["--csv", str(csv_path), "--out", str(out), *FAST])
        assert rc == 0
        files = final_images(out)
        assert sorted(files) == sorted(f"9_{i}" for i in range(n))
        assert_no_bad_final_files(out)
        for i in range(n):
            assert files[f"9_{i}"].read_bytes() == bodies[f"/k{i}"]
        assert all(srv.count(f"/k{k.split('_')[1]}") == 0 for k in before)  # kept, not refetched
        recs = by_key(read_manifest(out / "manifest.jsonl"))
        assert {k for k, r in recs.items() if r["status"] == "skipped"} == set(before)


# ---------------------------------------------------------------------------
# the reusable server itself (Range, HEAD, directory, faults, counts)
# ---------------------------------------------------------------------------
def test_local_server_features(tmp_path):
    import requests

    (tmp_path / "f.bin").write_bytes(bytes(range(256)) * 4)
    body = b"0123456789" * 10
    with LocalServer(directory=tmp_path) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        srv.add("/r", body, faults=[Fault(status=503), Fault(drop=True)])
        assert requests.get(srv.url("/r"), timeout=5).status_code == 503
        with pytest.raises(requests.ConnectionError):
            requests.get(srv.url("/r"), timeout=5)
        r = requests.get(srv.url("/r"), timeout=5)
        assert r.content == body and r.headers["Accept-Ranges"] == "bytes"
        r = requests.get(srv.url("/r"), headers={"Range": "bytes=90-"}, timeout=5)
        assert r.status_code == 206 and r.content == body[90:]
        assert r.headers["Content-Range"] == "bytes 90-99/100"
        r = requests.get(srv.url("/r"), headers={"Range": "bytes=-5"}, timeout=5)
        assert r.content == body[-5:]
        etag = r.headers["ETag"]
        r = requests.get(srv.url("/r"), headers={"Range": "bytes=10-", "If-Range": '"other"'}, timeout=5)
        assert r.status_code == 200 and r.content == body
        r = requests.get(srv.url("/r"), headers={"Range": "bytes=10-", "If-Range": etag}, timeout=5)
        assert r.status_code == 206
        assert requests.get(srv.url("/r"), headers={"Range": "bytes=500-"}, timeout=5).status_code == 416
        assert requests.head(srv.url("/r"), timeout=5).headers["Content-Length"] == "100"
        assert requests.get(srv.url("/f.bin"), timeout=5).content == (tmp_path / "f.bin").read_bytes()
        assert requests.get(srv.url("/../etc/passwd"), timeout=5).status_code == 404
        assert srv.count("/r") == 9
        assert ("GET", "/r", "bytes=90-") in srv.log


def test_trust_manifest_skips_reverification(server, tmp_path, monkeypatch):
    import utils.fetch.images as D

    for i in range(3):
        server.add(f"/t{i}.jpg", make_image("JPEG", (30 + i, 20)))
    csv_path = write_recall_csv(tmp_path / "r.csv", [("5", str(i), server.url(f"/t{i}.jpg")) for i in range(3)])
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv_path), "--out", str(out), *FAST]) == 0
    first = by_key(read_manifest(out / "manifest.jsonl"))
    assert all(r["mtime_ns"] for r in first.values())

    checked = []
    real = D.verify_existing
    monkeypatch.setattr(D, "verify_existing", lambda p, *a, **k: checked.append(Path(p).name) or real(p, *a, **k))
    touched = out / first["5_1"]["file"]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    server.reset_counts()
    assert download_images.main(["--csv", str(csv_path), "--out", str(out), *FAST, "--trust-manifest"]) == 0
    assert checked == [touched.name]  # only the file whose mtime changed is decoded
    assert server.total_requests == 0
    again = by_key(read_manifest(out / "manifest.jsonl"))
    assert {r["status"] for r in again.values()} == {"skipped"}
    for k in first:
        assert (again[k]["sha256"], again[k]["bytes"], again[k]["width"]) == (
            first[k]["sha256"],
            first[k]["bytes"],
            first[k]["width"],
        )
