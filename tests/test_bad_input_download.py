"""Bad input to the two downloaders (issue 14): for each class, the command, its exit
status, the one-line message and the absence of leftover files.

Network: only the test's own server on 127.0.0.1. The address-policy tests make other
hosts *resolve* (stubbed ``socket.getaddrinfo``) to link-local / private addresses and
guard urllib3's ``create_connection`` so that any attempt to connect anywhere but
127.0.0.1 fails the test instead of sending a packet.
"""

from __future__ import annotations

from utils.cli import DataError

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import urllib3.util.connection
from local_server import PROXY_VARS, LocalServer
from PIL import Image

import download_assets
import download_images
from utils.fetch import assets as A
from utils.fetch.http import AddressPolicy, BlockedAddressError, address_class
from utils.io import exclusive_lock

ROOT = Path(__file__).resolve().parent.parent
FAST = [
    "--timeout-connect",
    "2",
    "--timeout-read",
    "2",
    "--retries",
    "0",
    "--backoff",
    "0.01",
    "--workers",
    "2",
    "--no-progress",
]
HTML = b"<!DOCTYPE html><html><body>Not Found</body></html>\n"


def jpeg(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


def checkpoint_bytes() -> bytes:
    """Something shaped like a torch zip checkpoint, above the plausible minimum."""
    return b"PK\x03\x04" + os.urandom(100_000)


def recall_csv(path: Path, urls) -> Path:
    path.write_text("".join(f"1,景点,{u},{i},10,10,\n" for i, u in enumerate(urls)), encoding="utf-8")
    return path


def one_error_line(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


pytestmark = pytest.mark.usefixtures("no_proxy_env")


# ---------------------------------------------------------------------------
# 1. output locations checked before any work
# ---------------------------------------------------------------------------
def test_images_out_is_a_file_or_under_a_file(tmp_path, capsys, server):
    server.add("/a.jpg", jpeg())
    csv = recall_csv(tmp_path / "r.csv", [server.url("/a.jpg")])
    plain = tmp_path / "plain"
    plain.write_text("x")
    for out, expect in ((plain, "exists and is not a directory"), (plain / "sub", "is not a directory")):
        assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 2
        line = one_error_line(capsys.readouterr().err, "download_images")
        assert "--out" in line and expect in line
    assert server.total_requests == 0
    assert files_under(tmp_path) == ["plain", "r.csv"]


def test_images_log_file_that_is_a_directory(tmp_path, capsys, server):
    csv = recall_csv(tmp_path / "r.csv", [server.url("/a.jpg")])
    out = tmp_path / "out"
    (out / "download_images.log").mkdir(parents=True)
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 2
    line = one_error_line(capsys.readouterr().err, "download_images")
    assert "download_images.log" in line and "is a directory" in line
    assert files_under(out) == ["download_images.log"] and server.total_requests == 0


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs, where no one may create a file")
def test_images_unwritable_out(tmp_path, capsys, server):
    """An output place nobody can write in, root included (CI runs as root)."""
    csv = recall_csv(tmp_path / "r.csv", [server.url("/a.jpg")])
    out = Path("/sys/avas-download-test/out")
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 2
    assert "cannot write in /sys" in one_error_line(capsys.readouterr().err, "download_images")
    assert not out.parent.exists() and server.total_requests == 0


def test_assets_dest_is_a_file(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("x")
    for dest in (plain, plain / "sub"):
        assert download_assets.main(["--dest", str(dest), "--no-progress"]) == 2
        line = one_error_line(capsys.readouterr().err, "download_assets")
        assert f"--dest {dest}" in line
    assert files_under(tmp_path) == ["plain"]


# ---------------------------------------------------------------------------
# 5. the user's files are neither replaced nor wrongly trusted
# ---------------------------------------------------------------------------
def test_images_manifest_that_is_a_directory_is_refused(tmp_path, capsys, server):
    server.add("/a.jpg", jpeg())
    csv = recall_csv(tmp_path / "r.csv", [server.url("/a.jpg")])
    mine = tmp_path / "my_results"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    out = tmp_path / "out"
    rc = download_images.main(["--csv", str(csv), "--out", str(out), "--manifest", str(mine), *FAST])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "download_images")
    assert f"--manifest {mine}: is a directory" in line
    assert (mine / "keep.txt").read_text() == "precious"
    assert not Path(str(mine) + ".prev").exists() and not out.exists()
    assert server.total_requests == 0


def _manifest(tmp_path, entries) -> Path:
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"assets": entries}), encoding="utf-8")
    return m


WEIGHTS = {
    "name": "align_weights",
    "url": "https://example.invalid/w.pth",
    "path": "assets/weights/align_model.pth",
    "kind": "torch",
    "sha256": None,
}


def test_assets_html_page_is_not_pinned(tmp_path, capsys):
    """A mirror answering an HTML page: kept aside, not pinned; a good mirror later
    downloads (not 'present and verified') and pins the real file."""
    m = _manifest(tmp_path, [WEIGHTS])
    dest = tmp_path / "dest"
    final = dest / WEIGHTS["path"]
    with LocalServer() as bad:
        bad.add("/" + WEIGHTS["path"], HTML)
        rc = download_assets.main(
            [
                "--manifest",
                str(m),
                "--dest",
                str(dest),
                "--mirror",
                bad.base_url,
                "--no-progress",
                "--log-level",
                "WARNING",
            ]
        )
    assert rc == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert str(final) in line and "an HTML page" in line and "not a torch checkpoint" in line
    assert "not pinned" in line
    assert not final.exists() and not (dest / A.HASHES_FILE).exists()
    assert (final.parent / "align_model.pth.bad-content").read_bytes() == HTML
    assert not list(dest.rglob("*.part*"))

    good = checkpoint_bytes()
    with LocalServer() as mirror:
        mirror.add("/" + WEIGHTS["path"], good)
        assert (
            download_assets.main(
                ["--manifest", str(m), "--dest", str(dest), "--mirror", mirror.base_url, "--no-progress"]
            )
            == 0
        )
        assert mirror.count("/" + WEIGHTS["path"]) == 1
    out = capsys.readouterr().out
    assert "1 downloaded, 0 already present" in out
    assert final.read_bytes() == good
    rec = json.loads((dest / A.HASHES_FILE).read_text())["assets"]["align_weights"]
    assert rec["size"] == len(good)


def test_assets_page_pinned_by_an_older_version_is_set_aside(tmp_path, capsys):
    """An HTML page already in place with its sha256 pinned (what older versions did)
    is no longer 'present and verified': set aside, pin dropped, fetched again."""
    m = _manifest(tmp_path, [WEIGHTS])
    dest = tmp_path / "dest"
    final = dest / WEIGHTS["path"]
    final.parent.mkdir(parents=True)
    final.write_bytes(HTML)
    records = A.HashRecords(dest)
    records.put(A.load_manifest(m)[0], final, A.sha256_file(final), "old run")
    good = checkpoint_bytes()
    with LocalServer() as mirror:
        mirror.add("/" + WEIGHTS["path"], good)
        assert (
            download_assets.main(
                ["--manifest", str(m), "--dest", str(dest), "--mirror", mirror.base_url, "--no-progress"]
            )
            == 0
        )
    assert final.read_bytes() == good
    assert (final.parent / "align_model.pth.bad-content").read_bytes() == HTML
    assert "1 downloaded" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kind,path,body,ok",
    [
        ("torch", "w.pth", b"\x80\x02" + b"\x00" * 70_000, True),  # a pickle checkpoint
        ("torch", "w.pth", b"PK\x03\x04" + b"\x00" * 100, False),  # zip, but 104 bytes
        ("torch", "w.pth", b'{"error": "rate limited"}' + b" " * 70_000, False),
        ("npy", "t.npy", b"\x93NUMPY\x01\x00" + b" " * 200, True),
        ("npy", "t.npy", HTML, False),
        ("recall_csv", "r.csv", "1,红山,http://x/1.jpg,1,10,10,\n".encode(), True),
        ("recall_csv", "r.csv", b"a$record$b$record$c\n", False),
        ("rank_csv", "t.csv", "$record$".join(["7", "u", "v", "1", "2", "t", "c", "", "", ""]).encode(), True),
        ("rank_csv", "t.csv", b"1,2,3,4,5,6,7\n", False),
        ("recall_csv", "r.csv", b"1,\xff\xfe,u,1,1,1,\n", False),  # not UTF-8
        ("json", "config.json", b'{"model_type": "bert"}', True),
        ("json", "config.json", HTML, False),
        ("text", "vocab.txt", "[PAD]\n红\n".encode(), True),
        ("text", "vocab.txt", b"\x00\x01\x02binary", False),
        ("safetensors", "m.safetensors", (8).to_bytes(8, "little") + b'{"a": 1}' + b"\x00" * 70_000, True),
        ("safetensors", "m.safetensors", b"\x80" * 70_000, False),
        ("text", "vocab.txt", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", False),
    ],
)
def test_content_checks_per_kind(tmp_path, kind, path, body, ok):
    f = tmp_path / path
    f.write_bytes(body)
    asset = A.Asset(name="x", path=path, url="http://x/", kind=kind)
    problem = A.content_problem(asset, f)
    assert (problem is None) == ok, problem


def test_manifest_min_bytes(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"PK\x03\x04" + b"\x00" * 200_000)
    big = A.Asset(name="x", path="w.pth", url="http://x/", min_bytes=1_000_000)
    assert "too small for a torch checkpoint (at least 1000000 expected" in A.content_problem(big, f)
    m = _manifest(tmp_path, [dict(WEIGHTS, min_bytes="big")])
    with pytest.raises(DataError, match="'min_bytes' must be an integer"):
        A.load_manifest(m)


@pytest.mark.parametrize(
    "entry, message",
    [
        (dict(WEIGHTS, name=["x"]), "needs 'name' and 'path' \\(strings\\)"),
        (dict(WEIGHTS, path=7), "needs 'name' and 'path' \\(strings\\)"),
        (dict(WEIGHTS, sha256=12), "'sha256' must be 64 hex digits"),
        (dict(WEIGHTS, url=["http://x/"]), "'url' must be a string"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_named(tmp_path, entry, message):
    """A list or a number where the manifest wants a string is the one-line error, not a traceback."""
    with pytest.raises(DataError, match=message):
        A.load_manifest(_manifest(tmp_path, [entry]))


# ---------------------------------------------------------------------------
# 6. one run per destination
# ---------------------------------------------------------------------------
def test_assets_second_run_on_one_dest_fails_with_the_lock_message(tmp_path, capsys):
    m = _manifest(tmp_path, [WEIGHTS])
    dest = tmp_path / "dest"
    with exclusive_lock(dest):
        rc = download_assets.main(["--manifest", str(m), "--dest", str(dest), "--no-progress"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "download_assets")
    assert f"another run holds {dest / '.lock'} (pid {os.getpid()})" in line
    assert files_under(dest) == []


def test_images_second_run_on_one_out_fails_with_the_lock_message(tmp_path, capsys, server):
    server.add("/a.jpg", jpeg())
    csv = recall_csv(tmp_path / "r.csv", [server.url("/a.jpg")])
    out = tmp_path / "out"
    with exclusive_lock(out):
        assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 2
    assert "another run holds" in one_error_line(capsys.readouterr().err, "download_images")
    assert server.total_requests == 0 and files_under(out) == []
    # shards are separate runs: each has its own lock
    with exclusive_lock(out, ".lock.shard-0-of-2"):
        assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST, "--shard", "1/2"]) == 0


# ---------------------------------------------------------------------------
# 7. refused connections, private addresses, Ctrl-C, non-UTF-8 CSV
# ---------------------------------------------------------------------------
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_refused_connection_is_not_a_timeout(tmp_path, capsys):
    port = _closed_port()
    csv = recall_csv(tmp_path / "r.csv", [f"http://127.0.0.1:{port}/a.jpg"])
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 1
    rec = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert rec["error_kind"] == "connection" and "connection refused" in rec["error"]
    assert "timeout" not in capsys.readouterr().out

    m = _manifest(tmp_path, [dict(WEIGHTS, url=f"http://127.0.0.1:{port}/w.pth")])
    assert (
        download_assets.main(["--manifest", str(m), "--dest", str(tmp_path / "d"), "--no-progress", "--retries", "0"])
        == 1
    )
    err = capsys.readouterr().err
    assert f"cannot reach 127.0.0.1:{port}" in err and "(connection refused)" in err


@pytest.fixture
def fake_network(monkeypatch):
    """Stub DNS for *.example.test names, and make any connection attempt to an address
    other than 127.0.0.1 fail the test (recorded in ``attempts``) before a socket exists."""
    names: dict[str, str] = {}
    attempts: list = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = urllib3.util.connection.create_connection

    def getaddrinfo(host, port, *args, **kw):
        if isinstance(host, str) and host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port or 80))]
        if isinstance(host, str) and host.endswith(".example.test"):
            raise socket.gaierror(socket.EAI_NONAME, "unknown test name")
        return real_getaddrinfo(host, port, *args, **kw)

    def guarded(address, *args, **kw):
        host, port = address
        ips = {info[4][0] for info in socket.getaddrinfo(host, port)}
        if ips != {"127.0.0.1"}:
            attempts.append(address)
            raise AssertionError(f"connection attempt to {address} ({ips})")
        return real_connect(address, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", guarded)
    monkeypatch.setattr(socket, "create_connection", guarded)
    return names, attempts


def _manifest_records(out: Path) -> dict:
    recs = [json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines()]
    return {r["key"]: r for r in recs}


def test_images_host_name_resolving_to_private_is_refused(tmp_path, fake_network):
    names, attempts = fake_network
    names["images.example.test"] = "10.0.0.5"
    names["metadata.example.test"] = "169.254.169.254"
    csv = recall_csv(
        tmp_path / "r.csv",
        [
            "http://images.example.test/a.jpg",
            "http://metadata.example.test/latest/meta-data",
            "http://169.254.169.254/latest/meta-data",
        ],
    )
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 1
    recs = _manifest_records(out)
    assert {r["error_kind"] for r in recs.values()} == {"blocked_address"}
    assert "resolves to 10.0.0.5, a private address" in recs["1_0"]["error"]
    assert "link-local" in recs["1_1"]["error"] and "link-local" in recs["1_2"]["error"]
    assert "--allow-private-addresses" in recs["1_0"]["error"]
    assert attempts == []
    assert [p.name for p in out.iterdir() if not p.name.startswith(("manifest", "download_images"))] == []


def test_images_redirect_from_trusted_mirror_to_link_local_is_refused(tmp_path, fake_network, server):
    names, attempts = fake_network
    names["metadata.example.test"] = "169.254.169.254"
    server.add("/a.jpg", jpeg())
    server.add("/r.jpg", b"", redirect="http://metadata.example.test/latest/meta-data")
    csv = recall_csv(tmp_path / "r.csv", ["http://cdn.example.test/a.jpg", "http://cdn.example.test/r.jpg"])
    out = tmp_path / "out"
    rc = download_images.main(
        [
            "--csv",
            str(csv),
            "--out",
            str(out),
            *FAST,
            "--url-prefix-map",
            f"http://cdn.example.test/={server.base_url}/",
        ]
    )
    assert rc == 1
    recs = _manifest_records(out)
    assert recs["1_0"]["status"] == "ok"  # the named mirror itself is fine
    assert recs["1_1"]["error_kind"] == "blocked_address"
    assert "redirect from" in recs["1_1"]["error"] and "link-local" in recs["1_1"]["error"]
    assert attempts == []


def test_images_redirect_from_public_to_private_is_refused(tmp_path, fake_network, server, monkeypatch):
    """A public host (stubbed DNS) reached through a proxy on 127.0.0.1 redirects into the
    private network: refused, although the proxy itself is local."""
    names, attempts = fake_network
    names["cdn.example.test"] = "93.184.216.34"
    names["intranet.example.test"] = "10.0.0.5"
    server.add("/ok.jpg", jpeg())
    server.add("/r.jpg", b"", redirect="http://intranet.example.test/admin.jpg")
    monkeypatch.setenv("HTTP_PROXY", server.base_url)
    csv = recall_csv(tmp_path / "r.csv", ["http://cdn.example.test/ok.jpg", "http://cdn.example.test/r.jpg"])
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 1
    recs = _manifest_records(out)
    assert recs["1_0"]["status"] == "ok"
    assert recs["1_1"]["error_kind"] == "blocked_address"
    assert "a public address redirects to intranet.example.test (10.0.0.5" in recs["1_1"]["error"]
    assert sorted(server.log) == [("GET", "/ok.jpg", None), ("GET", "/r.jpg", None)]
    assert attempts == []


def test_assets_redirect_and_private_name_are_refused(tmp_path, fake_network, capsys):
    names, attempts = fake_network
    names["weights.example.test"] = "10.0.0.5"
    dest = tmp_path / "dest"
    m = _manifest(tmp_path, [dict(WEIGHTS, url="http://weights.example.test/w.pth")])
    assert download_assets.main(["--manifest", str(m), "--dest", str(dest), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "align_weights: refused http://weights.example.test/w.pth" in err and "10.0.0.5" in err
    with LocalServer() as mirror:
        mirror.add("/" + WEIGHTS["path"], b"", redirect="http://169.254.169.254/latest/meta-data")
        assert (
            download_assets.main(
                ["--manifest", str(m), "--dest", str(dest), "--mirror", mirror.base_url, "--no-progress"]
            )
            == 1
        )
    err = capsys.readouterr().err
    assert "refused the redirect from" in err and "169.254.169.254 is a link-local address" in err
    assert attempts == []
    assert [p for p in files_under(dest) if not p.endswith((".lock",))] in ([], ["assets", "assets/weights"])


def test_address_policy_rules():
    """The rules themselves (no resolution needed for literals)."""
    p = AddressPolicy()
    p.check("http://127.0.0.1:8000/a.jpg")  # a literal local address: meant as written
    p.check("http://10.0.0.5/a.jpg")
    p.check("http://[::1]:8000/a.jpg")
    for url in ("http://169.254.169.254/latest", "http://[fe80::1]/x", "http://0.0.0.0/x"):
        with pytest.raises(BlockedAddressError):
            p.check(url)
    with pytest.raises(BlockedAddressError):  # a redirect from a public address
        p.check("http://10.0.0.5/x", came_from="http://93.184.216.34/a.jpg")
    p.check("http://10.0.0.6/x", came_from="http://10.0.0.5/a.jpg")  # local to local
    AddressPolicy(allow_private=True).check("http://169.254.169.254/latest")
    assert [
        address_class(a) for a in ("8.8.8.8", "10.1.2.3", "127.0.0.1", "169.254.1.1", "::ffff:10.0.0.1", "100.64.0.1")
    ] == ["public", "private", "loopback", "link-local", "private", "private"]


def _wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def _env():
    return {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}


def test_ctrl_c_is_one_line_and_130(tmp_path):
    with LocalServer(drip=(1024, 0.05)) as srv:
        for i in range(4):
            srv.add(f"/s{i}.jpg", jpeg((200 + i, 200)))
        csv = recall_csv(tmp_path / "r.csv", [srv.url(f"/s{i}.jpg") for i in range(4)])
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "download_images.py"), "--csv", str(csv), "--out", str(out), *FAST],
            cwd=str(tmp_path),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(lambda: srv.total_requests > 0 or proc.poll() is not None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert [ln for ln in err.splitlines() if ln.strip()] == ["download_images: interrupted"]
        assert not list(out.glob(".*.part")) and not (out / ".lock").exists()

        weights = b"PK\x03\x04" + os.urandom(400_000)
        srv.add("/" + WEIGHTS["path"], weights)
        m = _manifest(tmp_path, [WEIGHTS])
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "download_assets.py"),
                "--manifest",
                str(m),
                "--dest",
                str(tmp_path / "d"),
                "--mirror",
                srv.base_url,
                "--no-progress",
                "--log-level",
                "WARNING",
            ],
            cwd=str(tmp_path),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(lambda: srv.count("/" + WEIGHTS["path"]) > 0 or proc.poll() is not None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert [ln for ln in err.splitlines() if ln.strip()] == ["download_assets: interrupted"]
        assert not (tmp_path / "d" / WEIGHTS["path"]).exists()  # only the resumable .part
        assert not (tmp_path / "d" / ".lock").exists()


def test_non_utf8_csv_names_the_line(tmp_path, capsys, server):
    csv = tmp_path / "r.csv"
    csv.write_bytes(
        "1,甲,http://x/1.jpg,1,1,1,\n2,乙,http://x/2.jpg,1,1,1,\n".encode() + b"3,\xb1\xfb,http://x/3.jpg,1,1,1,\n"
    )  # GBK bytes on line 3
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 2
    line = one_error_line(capsys.readouterr().err, "download_images")
    assert f"{csv}:3: not UTF-8 text (byte 0xb1 at column 3)" in line
    assert not out.exists()


def test_missing_csv_and_bad_numbers(tmp_path, capsys):
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    assert "--csv" in one_error_line(capsys.readouterr().err, "download_images")
    for bad in (["--workers", "0"], ["--retries", "-1"], ["--timeout-read", "nan"]):
        with pytest.raises(SystemExit) as e:
            download_images.main(["--csv", "x.csv", "--out", str(out), *bad])
        assert e.value.code == 2
    assert not out.exists()


# ---------------------------------------------------------------------------
# 8. a trickling server ends at the download deadline
# ---------------------------------------------------------------------------
def test_images_trickle_ends_at_the_deadline(tmp_path, server):
    server.add("/slow.jpg", jpeg((300, 200)), drip=(1, 0.05))  # one byte every 50 ms: minutes
    csv = recall_csv(tmp_path / "r.csv", [server.url("/slow.jpg")])
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST, "--download-deadline", "1"]) == 1
    assert time.monotonic() - t0 < 10
    rec = _manifest_records(out)["1_0"]
    assert rec["error_kind"] == "deadline" and "deadline of 1 s" in rec["error"], rec
    assert not list(out.glob(".*.part")) and not list(out.glob("1_0.*"))


def test_trickled_headers_end_at_the_deadline(tmp_path):
    """A server that sends its status line and headers a byte at a time (each byte within
    the read timeout) is cut off at the deadline too, retries included."""
    from utils.args import Downloads
    from utils.fetch import download_one, open_session

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                for b in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" * 100:
                    if stop.wait(0.05):
                        break
                    try:
                        conn.send(bytes([b]))
                    except OSError:
                        break

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/a.jpg"
        with open_session(Downloads(retries=3, backoff=0.01)) as session:
            t0 = time.monotonic()
            res = download_one(session, [url], tmp_path, "x", Downloads(timeout_connect=2, timeout_read=2, deadline=1))
        assert res.error_kind == "deadline" and time.monotonic() - t0 < 6, res
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_download_one_takes_a_deadline(tmp_path, server):
    """The API select_images uses: a deadline by default, and one it can pass."""
    import inspect

    from utils.args import IMAGE_DEADLINE, Downloads
    from utils.fetch import download_one, open_session

    assert inspect.signature(download_one).parameters["net"].default.deadline == IMAGE_DEADLINE
    server.add("/slow.jpg", jpeg((300, 200)), drip=(1, 0.05))
    net = Downloads(timeout_connect=2, timeout_read=2, deadline=0.5)
    with open_session(Downloads(retries=0)) as session:
        t0 = time.monotonic()
        res = download_one(session, [server.url("/slow.jpg")], tmp_path, "x", net)
    assert res.status == "failed" and res.error_kind == "deadline" and time.monotonic() - t0 < 8


def test_assets_trickle_ends_at_the_deadline(tmp_path, capsys):
    m = _manifest(tmp_path, [WEIGHTS])
    dest = tmp_path / "d"
    with LocalServer() as mirror:
        mirror.add("/" + WEIGHTS["path"], checkpoint_bytes(), drip=(1024, 0.1))  # 100 KB in 10 s
        t0 = time.monotonic()
        argv = ["--manifest", str(m), "--dest", str(dest), "--mirror", mirror.base_url, "--no-progress"]
        assert download_assets.main([*argv, "--download-deadline", "1"]) == 1
        assert time.monotonic() - t0 < 8
    err = capsys.readouterr().err
    assert "align_weights: not finished within the deadline of 1 s" in err and "rerun to resume" in err
    assert not (dest / WEIGHTS["path"]).exists()


# ---------------------------------------------------------------------------
# 9. planted symbolic links are not followed
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,what", [("download_images.log", "log file"), (".lock", "lock file")])
def test_images_symlink_planted_in_out_is_refused(tmp_path, capsys, server, name, what):
    server.add("/a.jpg", jpeg())
    csv = recall_csv(tmp_path / "r.csv", [server.url("/a.jpg")])
    target = tmp_path / "target.txt"
    target.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(target)
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 2
    line = one_error_line(capsys.readouterr().err, "download_images")
    assert f"{what} {out / name}: is a symbolic link" in line
    assert target.read_text() == "precious" and server.total_requests == 0
    assert files_under(out) == [name]


# ---------------------------------------------------------------------------
# 10. numbers that make every request fail are refused up front
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag,value",
    [
        ("--timeout-read", "0"),
        ("--timeout-connect", "-1"),
        ("--timeout", "0"),
        ("--backoff", "-0.5"),
        ("--download-deadline", "0"),
        ("--timeout-read", "inf"),
    ],
)
def test_zero_or_negative_timeouts_are_refused(tmp_path, capsys, flag, value):
    for main, argv in (
        (download_images.main, ["--csv", "x.csv", "--out", str(tmp_path / "o")]),
        (download_assets.main, ["--dest", str(tmp_path / "d")]),
    ):
        with pytest.raises(SystemExit) as e:
            main([*argv, flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    assert files_under(tmp_path) == []


def test_zero_backoff_means_no_wait(tmp_path, server):
    server.add("/a.jpg", jpeg())
    csv = recall_csv(tmp_path / "r.csv", [server.url("/a.jpg")])
    assert download_images.main(["--csv", str(csv), "--out", str(tmp_path / "o"), *FAST, "--backoff", "0"]) == 0


# ---------------------------------------------------------------------------
# 11. a manifest that is not UTF-8, a full disk, a file-size limit
# ---------------------------------------------------------------------------
def test_assets_manifest_not_utf8_names_the_line(tmp_path, capsys):
    m = tmp_path / "m.json"
    m.write_bytes(
        b'{"assets": [\n  {"name": "x",\n   "description": "\xb1\xfb",\n   "path": "a", "url": "http://a/"}]}'
    )
    assert download_assets.main(["--manifest", str(m), "--dest", str(tmp_path / "d"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err, "download_assets")
    assert f"{m}:3: not UTF-8 text (byte 0xb1" in line
    assert not (tmp_path / "d").exists()


def _big_jpegs(n: int) -> list[bytes]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def test_images_disk_full_is_one_line_and_nothing_half_written(tmp_path, capsys, server, monkeypatch):
    from utils.io import PartFile

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_init = PartFile.__init__

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        self.file = FullDisk(self.file)

    monkeypatch.setattr(PartFile, "__init__", init)
    for i in range(3):
        server.add(f"/{i}.jpg", jpeg())
    csv = recall_csv(tmp_path / "r.csv", [server.url(f"/{i}.jpg") for i in range(3)])
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 2
    line = one_error_line(capsys.readouterr().err, "download_images")
    assert "disk full while writing" in line and "MB free on that disk" in line
    assert [p for p in files_under(out) if not p.startswith(("manifest", "download_images"))] == []


def _limited(limit: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_is_one_line_and_nothing_half_written(tmp_path):
    """RLIMIT_FSIZE (EFBIG) in a child: images stop the run (exit 2); an asset fails (exit 1)."""
    bodies = _big_jpegs(3)
    assert all(len(b) > 40_000 for b in bodies)
    with LocalServer() as srv:
        for i, b in enumerate(bodies):
            srv.add(f"/{i}.jpg", b)
        csv = recall_csv(tmp_path / "r.csv", [srv.url(f"/{i}.jpg") for i in range(3)])
        out = tmp_path / "out"
        cmd = [sys.executable, str(ROOT / "download_images.py"), "--csv", str(csv), "--out", str(out), *FAST]
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, preexec_fn=_limited(30_000))
        assert r.returncode == 2, r.stderr
        line = one_error_line(r.stderr, "download_images")
        assert "file-size limit reached while writing" in line
        assert [p for p in files_under(out) if not p.startswith(("manifest", "download_images"))] == []

        srv.add("/" + WEIGHTS["path"], checkpoint_bytes())
        m = _manifest(tmp_path, [WEIGHTS])
        cmd = [sys.executable, str(ROOT / "download_assets.py"), "--manifest", str(m), "--dest", str(tmp_path / "d")]
        cmd += ["--mirror", srv.base_url, "--no-progress", "--log-level", "WARNING"]
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, preexec_fn=_limited(30_000))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "align_weights: file-size limit reached while writing" in r.stderr
    assert not (tmp_path / "d" / WEIGHTS["path"]).exists()


# ---------------------------------------------------------------------------
# 12. bad rows: refused by default, left out (and counted) with --skip-bad-rows
# ---------------------------------------------------------------------------
def test_images_bad_row_is_refused_unless_skipped(tmp_path, capsys, server):
    server.add("/a.jpg", jpeg())
    csv = tmp_path / "r.csv"
    csv.write_text(f"1,甲,{server.url('/a.jpg')},1,1,1,\n2,乙,only,three\n", encoding="utf-8")
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 2
    line = one_error_line(capsys.readouterr().err, "download_images")
    assert f"{csv}:2: expected 7 fields" in line and "--skip-bad-rows" in line
    assert server.total_requests == 0 and not out.exists()

    argv = ["--csv", str(csv), "--out", str(out), *FAST, "--skip-bad-rows", "--max-failures", "1"]
    assert download_images.main(argv) == 0
    assert "bad_row 1" in capsys.readouterr().out
    recs = [json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["line"], r["status"], r["error_kind"]) for r in recs if r["key"] is None] == [(2, "failed", "bad_row")]


# ---------------------------------------------------------------------------
# 13. DNS rebinding: the connection goes to the address that was checked
# ---------------------------------------------------------------------------
@pytest.fixture
def stub_dns(monkeypatch):
    """Answers for the test's names only (any other name: no such host, so no DNS query
    leaves); ``connects`` records every connection; ``mapped`` sends a stand-in public
    address to the local server; anything else but 127.0.0.1 fails the test."""
    answers: dict[str, list[str]] = {}
    asked, connects, mapped = [], [], {}
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kw):
        try:
            socket.inet_aton(host)
            return real_getaddrinfo(host, port, *args, **kw)
        except (OSError, TypeError):
            pass
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown test name")
        asked.append(host)
        ip = answers[host].pop(0) if len(answers[host]) > 1 else answers[host][0]  # rebinding: a new answer each time
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port or 80))]

    def guard(real):
        def connect(address, *args, **kw):
            connects.append(tuple(address))
            host, port = address
            if host in mapped:
                return real(("127.0.0.1", mapped[host]), *args, **kw)
            ips = {info[4][0] for info in getaddrinfo(host, port)}
            if ips != {"127.0.0.1"}:
                raise AssertionError(f"connection attempt to {address} ({ips})")
            return real(("127.0.0.1", port), *args, **kw)

        return connect

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", guard(urllib3.util.connection.create_connection))
    monkeypatch.setattr(socket, "create_connection", guard(socket.create_connection))
    return answers, asked, connects, mapped


PUBLIC = "93.184.216.34"  # a stand-in: the stubbed connect sends it to the local server


@pytest.mark.parametrize("host", ["rebind.example.test", "rebind.example.test."])  # with the final dot too
def test_dns_rebinding_connects_to_the_checked_address(tmp_path, server, stub_dns, host):
    answers, asked, connects, mapped = stub_dns
    answers[host] = answers[host.rstrip(".")] = [PUBLIC, "127.0.0.1"]  # public for the check, loopback after
    mapped[PUBLIC] = server.port
    server.add("/a.jpg", jpeg())
    csv = recall_csv(tmp_path / "r.csv", [f"http://{host}:{server.port}/a.jpg"])
    out = tmp_path / "out"
    assert download_images.main(["--csv", str(csv), "--out", str(out), *FAST]) == 0
    assert _manifest_records(out)["1_0"]["status"] == "ok"
    assert connects == [(PUBLIC, server.port)]  # never the name again, never 127.0.0.1
    assert asked == [host]  # resolved once


def test_hugging_face_files_go_through_the_address_policy(tmp_path, server, stub_dns, monkeypatch, capsys):
    """An hf asset comes from HF_ENDPOINT over the checked session: a redirect from there
    to a link-local address is refused like any other (and a good answer is fetched)."""
    import huggingface_hub.constants

    answers, _, connects, _ = stub_dns
    answers["metadata.example.test"] = ["169.254.169.254"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    vocab = "[PAD]\n[UNK]\n红\n".encode()
    asset = {"name": "bert_vocab", "path": "assets/bert/vocab.txt", "sha256": None}
    asset["hf"] = {"repo_id": "google-bert/bert-base-chinese", "filename": "vocab.txt"}
    m = _manifest(tmp_path, [asset])
    hub_path = "/google-bert/bert-base-chinese/resolve/main/vocab.txt"
    server.add(hub_path, b"", redirect="http://metadata.example.test/latest/meta-data")
    argv = ["--manifest", str(m), "--dest", str(tmp_path / "d"), "--no-progress"]
    assert download_assets.main(argv) == 1
    assert "refused the redirect from" in capsys.readouterr().err
    server.add(hub_path, vocab)
    assert download_assets.main(argv) == 0
    assert (tmp_path / "d" / "assets/bert/vocab.txt").read_bytes() == vocab
    assert {c[0] for c in connects} == {"127.0.0.1"}
