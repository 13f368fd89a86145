"""select_images.py --ray ADDRESS on a real two-node Ray cluster on 127.0.0.1, with token
authentication on (Ray's default once a token exists): a head (2 CPUs) and a second node
(1 CPU) started with ``ray start``, the job sized to finish on the head alone. The driver
runs as a user would (a subprocess, its own environment): the join refused without
RAY_AUTH_MODE=token or with a wrong token is one line within seconds; with the token the
selection equals the local run; the second node's raylet killed mid-run does not stop
the job; a rerun skips the shards written. The clusters have their own HOME (token),
temp dirs and ports, and are stopped by their process groups, never by name."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install -r requirements-ray.txt)")
psutil = pytest.importorskip("psutil", reason="psutil is not installed (requirements-dev.txt)")

from test_select_ray import _argv, _read, _summary, assert_same, env, local, local_runs  # noqa: E402, F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parent.parent
RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
# Ray rewrites a loopback head address given to a second node into the machine's interface
# address (where the head does not listen) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which
# in turn refuses a second node: the second node's `ray start` keeps the address as given.
RAY_NODE = [
    sys.executable,
    "-c",
    "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()",
]


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ours(home: Path) -> list:
    """The cluster's processes: its process groups, and the workers Ray starts in their own
    sessions, all known by the HOME the cluster was given."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("HOME") == str(home):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _stop(pgids: list[int], home: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in pgids:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        for p in _ours(home):
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and _ours(home):
            time.sleep(0.3)


def _safe_pgid(p) -> int | None:
    try:
        return None if p.status() == psutil.STATUS_ZOMBIE else os.getpgid(p.pid)
    except (ProcessLookupError, psutil.Error):
        return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    home = d / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # never the user's
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    gcs, *p = _ports(9)
    head = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2"]
    head += [f"--temp-dir={d / 't'}", "--include-dashboard=false", "--disable-usage-stats"]
    node = ["start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1"]
    node += ["--disable-usage-stats"]
    pgids = []
    try:
        for cmd, env, ports in (
            (RAY + head, {**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, p[:4]),
            (RAY_NODE + node, {**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token"}, p[4:8]),
        ):
            cmd = cmd + [
                f"--dashboard-agent-listen-port={ports[0]}",
                f"--dashboard-agent-grpc-port={ports[1]}",
                f"--runtime-env-agent-port={ports[2]}",
                f"--metrics-export-port={ports[3]}",
            ]
            proc = subprocess.Popen(
                cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            pgids.append(proc.pid)
            out = proc.communicate(timeout=180)[0].decode(errors="replace")
            assert proc.returncode == 0, out[-3000:]
        driver = {**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        yield {"address": f"127.0.0.1:{gcs}", "env": driver, "pgids": pgids, "home": home}
    finally:
        _stop(pgids, home)


def _select(cluster, argv, *, environ=None, wait=True):
    cmd = [sys.executable, str(ROOT / "select_images.py"), *argv, "--ray", cluster["address"], "--log-level", "INFO"]
    proc = subprocess.Popen(cmd, env=environ or {**cluster["env"], "RAY_AUTH_MODE": "token"}, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    return proc.communicate(timeout=900) + (proc.returncode,) if wait else proc


@pytest.mark.parametrize("auth", ["no-mode", "wrong-token"])
def test_refused_join_is_one_line_within_seconds(cluster, env, tmp_path, auth):  # noqa: F811
    bad = {**cluster["env"], **({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64} if auth != "no-mode" else {})}
    t = time.time()
    _, err, rc = _select(cluster, _argv(env, tmp_path / "o.csv"), environ=bad)
    lines = [x for x in err.strip().splitlines() if "INFO" not in x]
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"select_images: error: --ray {cluster['address']}: ")
    assert ("set RAY_AUTH_MODE=token" if auth == "no-mode" else "set RAY_AUTH_TOKEN") in lines[0]
    assert "InvalidAuthToken" not in err
    assert time.time() - t < 30  # Python and torch start-up included; the check itself is one request
    assert not (tmp_path / "o.csv").exists()


def test_two_nodes_equal_local_and_survive_a_lost_node(cluster, env, local, tmp_path):  # noqa: F811
    out = tmp_path / "sel"
    argv = _argv(env, out, "--shard-items", "1", "--actors", "1")
    _, err, rc = _select(cluster, argv)
    assert rc == 0, err[-3000:]
    assert_same(local["rows"], _read(out))
    s = _summary(out)
    assert s["status_counts"] == local["summary"]["status_counts"]
    assert sum(n.get("shards", 0) for n in s["ray"]["nodes"].values()) == s["ray"]["shards_written"]
    assert err.count("written (") == s["ray"]["shards_written"]  # one progress line per shard

    # the second node's raylet killed once the first shard is written: the head finishes
    lost = tmp_path / "lost"
    proc = _select(cluster, _argv(env, lost, "--shard-items", "1", "--actors", "1"), wait=False)
    deadline = time.time() + 600
    while not list(lost.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    raylets = [
        p
        for p in psutil.process_iter(["cmdline"])
        if _safe_pgid(p) == cluster["pgids"][1] and "raylet" in " ".join(p.info["cmdline"] or [])
    ]
    assert raylets and proc.poll() is None, "the run ended before the node could be stopped"
    raylets[0].kill()
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert_same(local["rows"], _read(lost))

    # a rerun skips the shards written; one removed is written again
    parts = sorted(lost.glob("part-*.parquet"))
    parts[0].unlink()
    _, err, rc = _select(cluster, _argv(env, lost, "--shard-items", "1", "--actors", "1"))
    assert rc == 0, err[-3000:]
    s = _summary(lost)
    assert s["ray"]["shards_skipped"] == len(parts) - 1 and s["ray"]["shards_written"] == 1
    assert_same(local["rows"], _read(lost))
