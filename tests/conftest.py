import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import make_bert_dir  # noqa: E402
from local_server import PROXY_VARS, LocalServer  # noqa: E402

# Real published files, used only when present: env var or ../shared beside the project.
SEED_DATA = Path(os.environ.get("AVAS_SEED_DATA", ROOT.parent / "shared" / "seed-data"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return make_bert_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def seed_data():
    if not SEED_DATA.is_dir():
        pytest.skip(f"seed data not found at {SEED_DATA} (set AVAS_SEED_DATA to use it)")
    return SEED_DATA


@pytest.fixture(scope="session")
def real_bert_dir(seed_data):
    d = seed_data / "bert-base-chinese"
    if not (d / "config.json").is_file():
        pytest.skip(f"{d} has no config.json")
    return d


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory):
    """ONNX exports of the tests' tiny models go to a temporary folder, never the user's
    cache (``--backend auto`` exports on a CPU)."""
    if "AVAS_ONNX_CACHE" not in os.environ:
        os.environ["AVAS_ONNX_CACHE"] = str(tmp_path_factory.mktemp("onnx_cache"))
    yield


@pytest.fixture
def unwritable_dir():
    """A directory in which no one may create a file, root included (CI runs as root):
    a name under Linux's sysfs."""
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("needs Linux sysfs, where no one may create a file")
    return Path("/sys/avas-test-unwritable")


@pytest.fixture
def no_proxy_env(monkeypatch):
    """Requests to 127.0.0.1 must go straight to the test server."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 for the test (stopped after it)."""
    with LocalServer() as srv:
        yield srv
