#!/usr/bin/env python
"""Benchmark download_images.py against a local server with injected latency.

    python bench/bench_download.py                      # 500 images, 50 ms, workers 1 and 32
    python bench/bench_download.py --images DIR         # serve real photos (cycled) instead

A threaded HTTP server on 127.0.0.1 (tests/local_server.py) serves N generated
images with a fixed latency before every response. download_images.py runs in
a child process once per worker count, into a fresh directory; the script
reports images/s (from the downloader's own timing, and wall time including
interpreter start), the speed-up over the first worker count, and the child's
peak RSS (``ru_maxrss`` from ``os.wait4``). Targets from the issue: 32 workers
>= 10x the single-worker rate, peak RSS < 300 MB. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from local_server import LocalServer  # noqa: E402


def generated_images(n: int, size=(320, 240), seed: int = 0) -> list[tuple[str, bytes]]:
    """n distinct small photos-like images: 4 in 5 JPEG, 1 in 5 PNG."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        base = rng.integers(0, 255, 3)
        arr = np.stack([(xx * (c + 1) + yy * (i % 7 + 1) + base[c]) % 256 for c in range(3)], -1)
        arr = (arr + rng.integers(0, 24, arr.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        fmt = "PNG" if i % 5 == 4 else "JPEG"
        Image.fromarray(arr).save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        # every fifth URL has no extension, as in the published recall set
        name = f"img{i}" if i % 5 == 3 else f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}"
        out.append((name, buf.getvalue()))
    return out


def images_from_dir(d: Path, n: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"{d}: no .jpg/.png files")
    return [(f"img{i}{files[i % len(files)].suffix}", files[i % len(files)].read_bytes()) for i in range(n)]


def run_measured(csv_path: Path, out: Path, workers: int, extra: list[str]) -> dict:
    """Run the downloader as a child; wall time, own timing, rc and peak RSS."""
    cmd = [
        sys.executable,
        str(ROOT / "download_images.py"),
        "--csv",
        str(csv_path),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--no-progress",
        *extra,
    ]
    log_path = out.parent / f"bench_w{workers}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text()
    m = re.search(r"(\d+) images/rows in ([\d.]+) s", text)
    n, secs = (int(m.group(1)), float(m.group(2))) if m else (0, wall)
    m_ok = re.search(r": ok (\d+)", text)
    ok = int(m_ok.group(1)) if m_ok else 0
    rss_kb = usage.ru_maxrss  # kilobytes on Linux
    if sys.platform == "darwin":
        rss_kb //= 1024
    return {
        "workers": workers,
        "rc": proc.returncode,
        "wall": wall,
        "seconds": secs,
        "images": n,
        "ok": ok,
        "rate": n / secs if secs else 0.0,
        "wall_rate": n / wall if wall else 0.0,
        "rss_mb": rss_kb / 1024,
        "cpu": usage.ru_utime + usage.ru_stime,
        "log": text,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="number of images")
    ap.add_argument("--latency", type=float, default=0.05, help="seconds before every response")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 32], help="worker counts to compare")
    ap.add_argument(
        "--images",
        type=Path,
        default=None,
        help="serve the .jpg/.png files of this directory (cycled) instead of generated ones",
    )
    ap.add_argument("--max-side", type=int, default=None, help="pass --max-side to the downloader")
    args = ap.parse_args(argv)

    images = images_from_dir(args.images, args.n) if args.images else generated_images(args.n)
    total_mb = sum(len(b) for _, b in images) / 1e6
    extra = ["--timeout-read", "30", "--retries", "2", "--backoff", "0.1"]
    if args.max_side:
        extra += ["--max-side", str(args.max_side)]

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp, LocalServer(latency=args.latency) as srv:
        tmp = Path(tmp)
        for name, body in images:
            srv.add("/" + name, body)
        csv_path = tmp / "bench.csv"
        csv_path.write_text(
            "".join(
                f"{i // 10},poi{i // 10},{srv.url('/' + name)},{i % 10},0,0,\n" for i, (name, _) in enumerate(images)
            ),
            encoding="utf-8",
        )
        print(
            f"{args.n} images ({total_mb:.1f} MB), {args.latency * 1000:.0f} ms latency per request, "
            f"server {srv.base_url}, {os.cpu_count()} CPUs"
        )
        for w in args.workers:
            srv.reset_counts()
            r = run_measured(csv_path, tmp / f"out_w{w}", w, extra)
            r["requests"] = srv.total_requests
            results.append(r)
            print(
                f"  workers {w:3d}: {r['rate']:7.1f} images/s ({r['images']} in {r['seconds']:.2f} s; "
                f"wall incl. start-up {r['wall']:.2f} s = {r['wall_rate']:.1f}/s), "
                f"ok {r['ok']}, exit {r['rc']}, requests {r['requests']}, "
                f"downloader CPU {r['cpu']:.1f} s, peak RSS {r['rss_mb']:.0f} MB"
            )
            if r["rc"] != 0:
                print(r["log"][-2000:])
    if len(results) >= 2 and results[0]["rate"] > 0:
        base = results[0]
        for r in results[1:]:
            print(
                f"speed-up workers {r['workers']} vs {base['workers']}: {r['rate'] / base['rate']:.1f}x (target >= 10x)"
            )
    print(f"peak RSS of the downloader: {max(r['rss_mb'] for r in results):.0f} MB (target < 300 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
