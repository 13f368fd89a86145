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


def _copy(src: str, dst: str, src_fs=None, dst_fs=None) -> None:
    """One file between two filesystems (the local one where None)."""
    import pyarrow.fs as pafs

    local = pafs.LocalFileSystem()
    pafs.copy_files(src, dst, source_filesystem=src_fs or local, destination_filesystem=dst_fs or local)


def put(fs, path: str, write) -> None:
    """``write(local_tmp)`` makes the file, copied to ``path`` under a temporary name then
    moved: readers never see half a file (a rename on a disk, a whole object on a store)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = os.path.join(d, os.path.basename(path))
        write(tmp)
        part = f"{path}.tmp{os.getpid()}"
        fs.create_dir(os.path.dirname(path), recursive=True)
        _copy(tmp, part, dst_fs=fs)
        fs.move(part, path)


@contextlib.contextmanager
def staged_cache(location: str, cands: list[Candidate]):
    """A local stand-in for the image cache at URI ``location``: the cached copies of the
    URLs pulled in, new downloads pushed back after (``file`` then names the URI copy)."""
    fs, base = open_dir(location)
    with tempfile.TemporaryDirectory() as stage:
        names = [url_stem(c.image) + ext for c in cands for ext in IMAGE_EXTS]
        had = {os.path.basename(i.path) for i in fs.get_file_info([join(base, n) for n in names]) if i.size}
        for name in had:
            _copy(join(base, name), os.path.join(stage, name), src_fs=fs)
        yield stage
        for name in {Path(c.file).name for c in cands if c.file} - had:
            put(fs, join(base, name), lambda tmp, n=name: os.replace(os.path.join(stage, n), tmp))
        for c in cands:
            c.file = join(location, Path(c.file).name) if c.file else None
