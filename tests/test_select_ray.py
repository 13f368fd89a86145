"""select_images.py --ray on a local Ray (2 CPUs, one session for the module): the same
rows as the local path (scores within 1e-5, same ranks and selections), the Parquet shard
output, workers that die once in every stage (retried: output complete, nothing twice), a
rerun that skips the shards already written, and the HTML report from the Ray run.
Real photos from the seed data join the generated images when present."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 (read on import)
ray = pytest.importorskip("ray", reason="ray is not installed (pip install -r requirements-ray.txt)")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed")

import numpy as np  # noqa: E402
from conftest import SEED_DATA  # noqa: E402
from fixtures import COLORS, png_bytes, solid_image, tiny_align, tiny_ranker, write_image  # noqa: E402
from local_server import LocalServer  # noqa: E402

import select_images  # noqa: E402
from models.checkpoint import save_align_checkpoint, save_ranker_checkpoint  # noqa: E402
from utils.formats.poi import save_tables  # noqa: E402
from utils.selection import cluster  # noqa: E402
from utils.selection import ray_runner as select_ray  # noqa: E402

# Ray's own DataContext warns about its renamed settings; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

DIM = 32
SCORE_TOL = 1e-5
STAGES = ("decode", "select", "write")  # fetch runs fused with decode: one task
# Ray on 127.0.0.1 only; the token path is ours, RAY_AUTH_MODE is set by ray.init: restored after.
# S3 (test_outputs_on_s3) is a local moto server whose address the workers get at start
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
RAY_ENV.update(AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL="")


@pytest.fixture(scope="module")
def env(tmp_path_factory, bert_dir):
    d = tmp_path_factory.mktemp("select_ray")
    ranker = tiny_ranker(bert_dir, seed=5)
    save_ranker_checkpoint(ranker, d / "ranker.ckpt")
    save_align_checkpoint(tiny_align(bert_dir, seed=13), d / "other_align.pth")
    rng = np.random.default_rng(1)
    known = ["西湖", "古镇"]
    save_tables({d / "pic.npz": {"西湖": [3, 1, 0], "古镇": [9, 2, 1]}}, kind="pic_num")
    save_tables({d / "img.npz": {n: rng.normal(size=DIM).astype(np.float32) for n in known}})
    save_tables({d / "name.npz": {n: rng.normal(size=DIM).astype(np.float32) for n in known}})

    srv = LocalServer().start()
    cat = d / "cat"
    photos = sorted((SEED_DATA / "sample-images").glob("*.jpg"))[:6] if (SEED_DATA / "sample-images").is_dir() else []
    colors = list(COLORS.values())
    rows = [["item_id", "title", "poi_names", "image"]]
    pois = ["西湖,古镇", "", "古镇", "西湖", " ", "古镇,西湖", "", "西湖"]
    n = 0
    for i in range(8):
        for j in range(4):
            if photos and (i + j) % 3 == 0:
                ref = str(photos[n % len(photos)])  # a real photo, absolute path
                n += 1
            elif j == 3 and i % 3 == 0:
                route = f"/p{i}"
                srv.add(
                    route, png_bytes(solid_image(colors[(i + j) % 8], size=(70, 50), seed=i)), content_type="image/png"
                )
                ref = srv.url(route)
            else:
                ref = f"imgs/{i}_{j}.jpg"
                write_image(
                    solid_image(
                        colors[(i + 2 * j) % 8],
                        size=(64 + 9 * j, 48 + 4 * i),
                        shape="圆" if j % 2 else "方",
                        seed=10 * i + j,
                    ),
                    cat / ref,
                )
            rows.append([f"it{i}", f"{list(COLORS)[i % 8]}色{'圆' if i % 2 else '方'}形", pois[i], ref])
    (cat / "imgs" / "bad.jpg").write_bytes(b"no image")
    srv.add("/gone", b"", status=404)
    rows += [
        ["it1", "x", "", "imgs/bad.jpg"],
        ["it2", "x", "", "imgs/absent.jpg"],
        ["it3", "x", "", rows[13][3]],
        ["it4", "x", "", srv.url("/gone")],
        ["dead", "黑色", "", "imgs/bad.jpg"],
    ]
    with open(cat / "items.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    yield {"dir": d, "csv": cat / "items.csv", "bert": bert_dir}
    srv.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One local Ray for the module, on 127.0.0.1, with its own token (never the user's
    ~/.ray/auth_token); the environment it changes is restored."""
    fail_dir = tmp_path_factory.mktemp("ray_fail")
    token = tmp_path_factory.mktemp("ray_auth") / "auth_token"
    token.write_text("0" * 64)
    saved = {k: os.environ.get(k) for k in (select_ray.FAIL_ENV, *RAY_ENV, "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    s3 = f"http://127.0.0.1:{_free_port()}"
    os.environ.update({select_ray.FAIL_ENV: str(fail_dir), **RAY_ENV, "RAY_AUTH_TOKEN_PATH": str(token)})
    os.environ["AWS_ENDPOINT_URL"] = s3
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()  # an earlier in-process Ray (another test file) cached its token and mode
    started = select_ray.connect_ray(None, num_cpus=2, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield fail_dir
    finally:
        if started:
            ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()  # Ray caches the mode and the token: a later ray.init reads them anew


def _argv(env, out, *extra, recall=None):
    d = env["dir"]
    argv = [
        "--items",
        str(env["csv"]),
        "--out",
        str(out),
        "--ranker-checkpoint",
        str(d / "ranker.ckpt"),
        "--bert-dir",
        str(env["bert"]),
        "--recall-k",
        "2",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--image-cache",
        str(d / "url_cache"),
        "--no-progress",
        "--backend",
        "torch",
        "--poi-pic-num",
        str(d / "pic.npz"),
        "--poi-image-vectors",
        str(d / "img.npz"),
        "--poi-name-vectors",
        str(d / "name.npz"),
        *extra,
    ]
    if recall:
        argv += ["--recall-checkpoint", str(d / recall)]
    return argv


def _read(out: Path) -> list[dict]:
    """The rows of a CSV, or of a directory of shards in the catalogue's order (items by
    first line, candidates by line): the shards hold whole items, by a hash of item_id."""
    if out.suffix == ".csv":
        with open(out, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    rows = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    first: dict = {}
    for r in rows:
        first[r["item_id"]] = min(first.get(r["item_id"], r["line"]), r["line"])
    rows.sort(key=lambda r: (first[r["item_id"]], r["line"]))
    return [
        {k: "" if v is None else (f"{v:.9g}" if isinstance(v, float) else str(v)) for k, v in r.items()} for r in rows
    ]


def _summary(out: Path) -> dict:
    return json.loads(Path(f"{out}.summary.json").read_text(encoding="utf-8"))


def assert_same(local: list[dict], other: list[dict]) -> None:
    """Same rows in the same order; scores within 1e-5; ranks, statuses, selections equal."""
    assert len(other) == len(local)
    assert len({r["line"] for r in other}) == len(other)  # nothing written twice
    for a, b in zip(local, other):
        for k in ("item_id", "line", "image", "status", "recall_rank", "final_rank", "selected", "file", "detail"):
            assert a[k] == b[k], (k, a, b)
        for k in ("recall_score", "ranker_score"):
            assert (a[k] == "") == (b[k] == ""), (k, a, b)
            if a[k]:
                assert abs(float(a[k]) - float(b[k])) <= SCORE_TOL, (k, a, b)


@pytest.fixture(scope="module")
def local_runs(env):
    """``run(path)``: the local run of an encode path ("single" or "two"), made once."""
    runs: dict = {}

    def run(path: str) -> dict:
        if path not in runs:
            recall = "other_align.pth" if path == "two" else None
            out = env["dir"] / f"local_{path}.csv"
            assert select_images.main(_argv(env, out, recall=recall)) == 0
            runs[path] = {"rows": _read(out), "summary": _summary(out), "recall": recall, "path": path}
        return runs[path]

    return run


@pytest.fixture(scope="module")
def local(local_runs):
    """The local run the Ray tests compare with (one encode path is enough for them)."""
    return local_runs("single")


@pytest.mark.parametrize("path", ["single", "two"])
def test_ray_output_equals_local(env, ray_session, local_runs, path, tmp_path):
    local = local_runs(path)
    out = tmp_path / "ray.csv"
    html = tmp_path / "ray.html"
    assert (
        select_images.main(_argv(env, out, "--ray", "--shard-items", "3", "--html", str(html), recall=local["recall"]))
        == 0
    )
    rows, s = _read(out), _summary(out)
    assert_same(local["rows"], rows)
    ls = local["summary"]
    assert s["encode_path"] == ls["encode_path"] == local["path"]
    for k in (
        "items",
        "candidates",
        "items_selected",
        "items_without_readable_candidate",
        "status_counts",
        "stage2_candidates",
        "bad_rows",
    ):
        assert s[k] == ls[k], k
    parts = list((tmp_path / "ray.csv.shards").glob("part-*.parquet"))
    assert s["ray"]["shards"] == s["ray"]["shards_written"] == len(parts) >= 2
    assert {"unreadable", "missing", "download_failed", "duplicate"} <= {r["status"] for r in rows}
    # the HTML report works from the Ray run
    text = html.read_text(encoding="utf-8")
    assert text.count('class="sel"') == s["items_selected"] and ">dead<" in text
    assert s["html"]["thumbnails"] > 0


def test_worker_deaths_are_retried(env, ray_session, local, tmp_path):
    for stage in STAGES:  # every stage's first worker dies once
        (ray_session / stage).write_text("armed")
    out = tmp_path / "retry.csv"
    assert select_images.main(_argv(env, out, "--ray", "--shard-items", "3")) == 0
    assert not any((ray_session / s).exists() for s in STAGES), "the failures were not injected"
    rows = _read(out)
    assert_same(local["rows"], rows)  # complete, in order, no line twice
    assert len(list((tmp_path / "retry.csv.shards").glob("part-*.parquet"))) == _summary(out)["ray"]["shards"] >= 2


def test_parquet_shards_and_rerun_skips_finished(env, ray_session, local, tmp_path):
    out = tmp_path / "shards"
    argv = _argv(env, out, "--ray", "--shard-items", "3")
    assert select_images.main(argv) == 0
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == _summary(out)["ray"]["shards"] >= 2
    assert_same(local["rows"], _read(out))
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    assert select_images.main(argv) == 0
    s = _summary(out)
    assert s["ray"]["shards_skipped"] == len(parts) - 1 and s["ray"]["shards_written"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("part-*.parquet")) if p.name != parts[1].name} == {
        k: v for k, v in mtimes.items() if k != parts[1].name
    }
    assert_same(local["rows"], _read(out))
    # everything done: a third run starts no Ray work at all
    assert select_images.main(argv) == 0
    assert _summary(out)["ray"]["shards_written"] == 0
    # another setting: the old shards are not reused
    assert select_images.main(_argv(env, out, "--ray", "--shard-items", "3", "--recall-k", "1")) == 0
    assert _summary(out)["ray"]["shards_written"] == len(parts)


def test_parquet_catalogue(env, ray_session, local, tmp_path, monkeypatch):
    """--items as Parquet (row i = line i + 2, as in the CSV): the same rows as the CSV run;
    --no-progress holds from the first stage (the count) on."""
    import pyarrow as pa
    import ray.data

    bars = []

    def count(path):
        bars.append(ray.data.DataContext.get_current().enable_progress_bars)
        return cluster.count_catalogue(path)

    monkeypatch.setattr(select_ray, "count_catalogue", count)
    monkeypatch.setattr(ray.data.DataContext.get_current(), "enable_progress_bars", True)  # as in a new driver

    with open(env["csv"], encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    table = pa.table({name: [r[i] for r in rows[1:]] for i, name in enumerate(rows[0])})
    items = env["csv"].with_suffix(".parquet")
    pq.write_table(table, items, row_group_size=7)  # several read tasks; items spread over them
    argv = _argv(env, tmp_path / "pq.csv", "--ray", "--shard-items", "5")
    argv[argv.index("--items") + 1] = str(items)
    assert select_images.main(argv) == 0
    assert_same(local["rows"], _read(tmp_path / "pq.csv"))
    assert bars == [False]


def test_bad_rows_skipped_on_the_cluster_as_locally(env, ray_session, local, tmp_path):
    """Bad rows read by the workers: with --skip-bad-rows left out, counted and listed by
    file and line in the summary as in the local run; the other rows are the local run's."""
    items = env["csv"].with_name("items_bad.csv")
    text = env["csv"].read_bytes().splitlines(keepends=True)
    items.write_bytes(b"".join(text[:3] + [b"it9,t,,\n", b"it0,\xff\xfe,,x.jpg\n"] + text[3:] + [b"it1,x\n"]))
    summaries = []
    for name, extra in (("local.csv", []), ("ray.csv", ["--ray", "--shard-items", "3"])):
        argv = _argv(env, tmp_path / name, "--skip-bad-rows", *extra)
        argv[argv.index("--items") + 1] = str(items)
        assert select_images.main(argv) == 0
        summaries.append(_summary(tmp_path / name))
    assert summaries[0]["bad_rows"] == summaries[1]["bad_rows"] == 3
    assert summaries[0]["bad_row_list"] == summaries[1]["bad_row_list"]
    assert [e.split(": ")[0] for e in summaries[1]["bad_row_list"]] == [f"{items}:{n}" for n in (4, 5, len(text) + 3)]
    assert_same(_read(tmp_path / "local.csv"), _read(tmp_path / "ray.csv"))


def test_outputs_on_a_filesystem_uri(env, ray_session, local, tmp_path):
    """--out and --image-cache as file:// URIs: the workers write the shards and the
    downloaded images there, the summary goes beside the shards; the catalogue's rows are
    the local run's, and the images of a new item's URLs are cached under their URI."""
    srv = LocalServer().start()
    try:
        for k, color in enumerate(("红", "蓝")):
            srv.add(f"/w{k}", png_bytes(solid_image(COLORS[color], size=(60, 40), seed=k)), content_type="image/png")
        items = env["csv"].with_name("items_web.csv")  # beside the catalogue: its relative paths hold
        web = "".join(f"web,红色方形,,{srv.url(f'/w{k}')}\n" for k in range(2))
        items.write_text(env["csv"].read_text(encoding="utf-8") + web, encoding="utf-8")
        argv = _argv(env, f"file://{tmp_path}/sel", "--ray", "--shard-items", "3")
        argv[argv.index("--image-cache") + 1] = f"file://{tmp_path}/cache"
        argv[argv.index("--items") + 1] = str(items)
        assert select_images.main(argv) == 0
        rows = _read(tmp_path / "sel")
        cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert len(cached) == 2 and all(n.startswith("u") for n in cached)
        assert_same(local["rows"], [r for r in rows if r["item_id"] != "web"])
        web_rows = [r for r in rows if r["item_id"] == "web"]
        assert [r["status"] for r in web_rows] == ["ok", "ok"]
        assert sorted(r["file"] for r in web_rows) == [f"file://{tmp_path}/cache/{n}" for n in cached]
        s = json.loads((tmp_path / "sel.summary.json").read_text(encoding="utf-8"))
        assert s["candidates"] == len(rows) and s["downloads"]["downloaded"] == 2
        assert s["ray"]["shards_written"] == len(list((tmp_path / "sel").glob("part-*")))
        # another setting: every shard again, the images pulled from the URI, not downloaded
        mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
        argv[argv.index("--recall-k") + 1] = "1"
        assert select_images.main(argv) == 0
        s = json.loads((tmp_path / "sel.summary.json").read_text(encoding="utf-8"))
        assert s["ray"]["shards_written"] == s["ray"]["shards"]
        assert s["downloads"]["downloaded"] == 0 and s["downloads"]["reused"] == 2
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == mtimes
    finally:
        srv.stop()


@pytest.fixture
def s3(ray_session):
    """moto's S3 server at the session's AWS_ENDPOINT_URL on 127.0.0.1 (its own session,
    stopped by its process group) and a bucket: pyarrow never reaches for AWS."""
    pytest.importorskip("moto", reason="moto is not installed (requirements-dev.txt)")
    import socket
    import subprocess
    import sys
    import time

    import pyarrow.fs as pafs

    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        fs = pafs.S3FileSystem(
            access_key="test", secret_key="test", region="us-east-1", scheme="http",
            endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True,
        )  # fmt: skip
        fs.create_dir("sel-bucket")
        yield fs
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_outputs_on_s3(env, local, s3, tmp_path):
    """--out and --image-cache on an S3-compatible server (moto, 127.0.0.1): the shards and
    the summary are there, the rows are the local run's."""
    argv = _argv(env, "s3://sel-bucket/sel", "--ray", "--shard-items", "3")
    argv[argv.index("--image-cache") + 1] = "s3://sel-bucket/cache"
    assert select_images.main(argv) == 0
    got = tmp_path / "sel"
    got.mkdir()
    import pyarrow.fs as pafs

    names = [i.path for i in s3.get_file_info(pafs.FileSelector("sel-bucket/sel")) if i.path.endswith(".parquet")]
    for name in names:
        pafs.copy_files(name, str(got / Path(name).name), source_filesystem=s3)
    assert_same(local["rows"], _read(got))
    with s3.open_input_stream("sel-bucket/sel.summary.json") as f:
        s = json.loads(f.read())
    assert s["candidates"] == len(local["rows"]) and s["ray"]["shards_written"] == len(names) >= 2


def test_page_is_a_bounded_sample(env, ray_session, local, tmp_path, monkeypatch):
    """Beyond PAGE_ITEMS items the page shows a sample of that many, and says so; the
    summary still counts every item (local and Ray alike)."""
    from utils.selection import run as run_module

    monkeypatch.setattr(run_module, "PAGE_ITEMS", 4)
    for name, extra in (("local.csv", []), ("ray.csv", ["--ray", "--shard-items", "3"])):
        html = tmp_path / f"{name}.html"
        assert select_images.main(_argv(env, tmp_path / name, "--html", str(html), *extra)) == 0
        text = html.read_text(encoding="utf-8")
        assert text.count('<div class="poi') == 4 and "a sample of 4" in text
        assert _summary(tmp_path / name)["items"] == 9
