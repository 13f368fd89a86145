"""Headless Chromium for the HTML report tests (Debian's package; tests skip without it).

The reports write what their thumbnails did into
``<div id="thumb-check" data-loaded=".." data-failed=".." data-total="..">`` once every
visible image has decoded. That happens asynchronously, so on a loaded machine a
``--dump-dom`` can come before it: ``thumb_check`` then loads the page again (a few
times) instead of reading an unfinished page as a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

CHROMIUM = next(
    (
        p
        for p in (
            os.environ.get("CHROMIUM"),
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            "/usr/bin/chromium",
        )
        if p and os.path.isfile(p)
    ),
    None,
)
SKIP_REASON = "chromium not installed (apt-get install chromium; .ci/run tries to)"


def run_chromium(args, tmp_path, timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def read_check(dom: str) -> dict:
    m = re.search(r'<div id="thumb-check"([^>]*)>', dom)
    assert m, "thumb-check element not found in the dumped DOM"
    attrs = dict(re.findall(r'data-(\w+)="(\d*)"', m.group(1)))
    return {k: int(v) for k, v in attrs.items() if v}


def thumb_check(url: str, tmp_path, tries: int = 4) -> tuple[dict, str]:
    """``(counts, dom)`` of the page once its thumbnail check has run."""
    for _ in range(tries):
        out = run_chromium(["--dump-dom", url], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        counts = read_check(out.stdout)
        if "total" in counts:
            return counts, out.stdout
    raise AssertionError(f"{url}: the thumbnail check never ran in {tries} loads")
