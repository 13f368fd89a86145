"""Joining a Ray cluster (or starting a local Ray) for ``select_images.py --ray``. A
cluster with token authentication takes ``RAY_AUTH_MODE=token`` and its token; a join
refused for its token is one line naming what to set, within a second (Ray itself would
retry for about half a minute)."""

from __future__ import annotations

from utils.cli import UserError

import contextlib
import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
FAIL_ENV = "AVAS_SELECT_RAY_FAIL_DIR"  # tests: a file <dir>/<stage> makes that stage's worker die once
PASS_ENV = ("AVAS_ONNX_CACHE", FAIL_ENV, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
STORE_ENV = ("AWS_", "GOOGLE_", "AZURE_", "HADOOP_")  # a local Ray's workers reach the driver's storage
EXCLUDES = [".git/", ".venv/", "data/", "assets/", "runs/", "**/__pycache__/"]
EXCLUDES += ["*.pth", "*.ckpt", "*.npy", "*.npz", "*.onnx", "*.parquet"]
HOST_PORT = re.compile(r"[\w.\-]+:\d+|\[[0-9a-fA-F:]+\]:\d+")
TOKEN_HELP = (
    "the token is read from RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; "
    "`ray get-auth-token` on the head node prints the cluster's"
)


def runtime_env(address: str | None) -> dict:
    """Workers import this project: on a local Ray through PYTHONPATH (with the driver's
    storage credentials), on a cluster by shipping the code (data files left out)."""
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV or (not address and k.startswith(STORE_ENV))}
    if address:
        return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return {"env_vars": env}


@contextlib.contextmanager
def _quiet_stderr():
    """Ray's C++ client logs each failed attempt to file descriptor 2: hidden here."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_token(address: str) -> None:
    """One request to the cluster's GCS at ``address`` (HOST:PORT), as the driver's join
    makes it: a missing or refused token is a ``UserError`` naming the variable."""
    from ray._raylet import AuthenticationTokenLoader, GcsClient
    from ray.exceptions import AuthenticationError

    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e})") from None
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "token" and not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise UserError(f"--ray {address}: RAY_AUTH_MODE=token but no token was found ({TOKEN_HELP})")
    try:
        with _quiet_stderr():
            GcsClient(address=address)  # asks for the cluster id: refused at once without the token
    except AuthenticationError:
        refused = "refused the token: set RAY_AUTH_TOKEN to its token"
        why = refused if mode == "token" else "requires a token: set RAY_AUTH_MODE=token"
        raise UserError(f"--ray {address}: the cluster {why} ({TOKEN_HELP})") from None
    except Exception as e:  # unreachable and the like: ray.init says it below
        log.debug("token check of %s: %s", address, e)


def connect_ray(address: str | None = None, **init_kw) -> bool:
    """Join ``address`` (or RAY_ADDRESS), else start a local Ray in this process.
    Returns True when this call started the session (the caller shuts it down)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        # a Ray of this machine only: on the loopback address, not the machine's interface,
        # where a head on 127.0.0.1 does not listen (read when Ray is first imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if address and HOST_PORT.fullmatch(address):
        check_token(address)
    kw = dict(include_dashboard=False, log_to_driver=True) if not address else {}
    # "local": a new Ray in this process, never a `ray start` cluster Ray would find on the machine
    quiet = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR
    kw["logging_level"] = quiet  # Ray's start-up notices; our own lines say what happens
    try:
        ray.init(address=address or "local", runtime_env=runtime_env(address), **{**kw, **init_kw})
    except ConnectionError as e:
        raise UserError(f"--ray {address}: cannot join the Ray cluster ({e})") from None
    import ray.data  # sets up its own console logging on import

    logging.getLogger("ray").setLevel(max(quiet, logging.WARNING))
    for h in logging.getLogger("ray.data").handlers:  # its log file keeps everything
        if isinstance(h, logging.StreamHandler):
            h.setLevel(quiet)
    log.info("Ray %s: %s", "cluster " + address if address else "started locally", ray.cluster_resources())
    return True
