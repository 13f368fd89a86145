"""Where a Ray run's shards, summary and downloaded images live: a path every node sees,
or a filesystem URI that pyarrow understands (``file://``, ``s3://``, ``gs://``,
``hdfs://``; credentials as pyarrow finds them on each node)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from utils.formats import IMAGE_EXTS

from .catalogue import Candidate, url_stem


def is_uri(location) -> bool:
    return "://" in str(location)


def open_dir(location: str):
    """``(pyarrow filesystem, path on it)`` of a URI or a local path."""
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def list_files(fs, d: str) -> list[str]:
    """Base names of the files in ``d`` (none when it does not exist)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)


def put(fs, path: str, write) -> None:
    """``write(local_tmp)`` makes the file, copied to ``path`` under a temporary name then
    moved: readers never see half a file (a rename on a disk, a whole object on a store)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = os.path.join(d, os.path.basename(path))
        write(tmp)
        part = f"{path}.tmp{os.getpid()}"
        fs.create_dir(os.path.dirname(path), recursive=True)
        with open(tmp, "rb") as src, fs.open_output_stream(part) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        fs.move(part, path)


def put_file(location: str, write) -> None:
    fs, path = open_dir(location)
    put(fs, path, write)


@contextlib.contextmanager
def staged_cache(location: str, cands: list[Candidate]):
    """A local directory standing in for the image cache at URI ``location`` while a shard
    is prepared: the cached copies of its URLs pulled in first (the downloader reuses
    them), its new downloads pushed back after; ``file`` then names the cached copy."""
    fs, base = open_dir(location)
    with tempfile.TemporaryDirectory() as stage:
        names = [url_stem(c.image) + ext for c in cands for ext in IMAGE_EXTS]
        had = {os.path.basename(i.path) for i in fs.get_file_info([join(base, n) for n in names]) if i.size}
        for name in had:
            _pull(fs, join(base, name), stage)
        yield stage
        for name in {Path(c.file).name for c in cands if c.file} - had:
            fs.create_dir(base, recursive=True)
            put(fs, join(base, name), lambda tmp, n=name: os.replace(os.path.join(stage, n), tmp))
        for c in cands:
            c.file = join(location, Path(c.file).name) if c.file else None


def _pull(fs, path: str, stage: str) -> None:
    with fs.open_input_stream(path) as src, open(os.path.join(stage, os.path.basename(path)), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
