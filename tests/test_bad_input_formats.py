"""Bad input to the file formats: images the fast decoder cannot classify, decompression
bombs, POI tables with negative or non-finite counts, truncated or garbage .npz/.npy
files, bad rows given to build_poi_tables.py. Each case: the outcome, the one-line
message naming the file, no leftover files."""

from utils.cli import DataError

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.lib.format as npformat
import pytest
import torch
from fixtures import solid_image, tiny_align, write_image
from PIL import Image

import build_poi_tables
import poi_tables
from models.checkpoint import save_align_checkpoint
from utils.formats.images import ZERO_TENSOR, load_image, reference_rgb, to_tensor
from utils.formats.poi import PoiTableError, load_poi_table, load_poi_tables, save_tables
from utils.formats.results import load_embeddings

DATA = Path(__file__).resolve().parent / "data"
PILLOW_DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own default


def one_line(capsys, prog: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def pillow_bits(path):
    return to_tensor(reference_rgb(path))


# ---------------------------------------------------------------------------
# images: any failure of the fast decoder goes to Pillow
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["1x4", "4x1", "1x3", "3x1", "2x4", "4x2", "1x2", "2x1"])
def test_odd_luma_samplings_give_pillow_bits(sampling):
    """tests/data/luma-AxB.jpg, made with ``cjpeg -sample AxB -quality 90`` (40 x 48 pixels).
    simplejpeg's header reader raises KeyError on 1x4 and ValueError on several others;
    each photo must still decode with Pillow's bits."""
    path = DATA / f"luma-{sampling}.jpg"
    x, ok = load_image(path)
    assert ok and torch.equal(x, pillow_bits(path))


@pytest.mark.parametrize("where", ["decode_jpeg_header", "decode_jpeg"])
@pytest.mark.parametrize("error", [KeyError(6), RuntimeError("boom"), IndexError(1)])
def test_any_exception_of_the_fast_decoder_falls_back(tmp_path, monkeypatch, where, error):
    import utils.formats.images as images

    if images.simplejpeg is None:
        pytest.skip("simplejpeg is not installed: Pillow decodes everything")
    path = write_image(solid_image((200, 30, 90), size=(64, 48), shape="圆"), tmp_path / "p.jpg")

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(images.simplejpeg, where, fail)
    x, ok = load_image(path)
    assert ok and torch.equal(x, pillow_bits(path))


# ---------------------------------------------------------------------------
# images: Pillow's decompression-bomb bound, as the reference runs it
# ---------------------------------------------------------------------------
def test_pillow_default_bound_is_left_alone():
    import utils.formats.images  # noqa: F401  (importing it must not move the bound)

    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def _jpeg_with_size(w: int, h: int) -> bytes:
    """A small real JPEG whose frame header claims ``w`` x ``h``."""
    import io

    buf = io.BytesIO()
    solid_image((90, 90, 90), size=(8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_bomb_just_above_twice_the_default_is_refused(tmp_path, caplog, kind):
    """13380 x 13380 = 179.02 MP, just above Pillow's refusal bound (2 x 89.48 MP): the
    reference gets no image, and so do we (the zero image, with a warning), before
    any pixel memory is taken."""
    side = 13380
    assert side * side > 2 * PILLOW_DEFAULT_MAX_PIXELS > (side - 3) ** 2
    path = tmp_path / f"bomb.{kind}"
    path.write_bytes(_png_header_only(side, side) if kind == "png" else _jpeg_with_size(side, side))
    with caplog.at_level(logging.WARNING):
        x, ok = load_image(path)
    assert not ok and torch.equal(x, ZERO_TENSOR)
    assert "DecompressionBombError" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_both_sides_of_the_bound(tmp_path, monkeypatch, caplog, kind):
    """With the bound made small: an image of exactly 2 x MAX_IMAGE_PIXELS decodes (as
    Pillow does, through the fast decoder for a JPEG), one pixel row more is refused
    (and never reaches the fast decoder)."""
    import utils.formats.images as images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    calls = []
    if images.simplejpeg is not None:
        real = images.simplejpeg.decode_jpeg
        monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    below = write_image(solid_image((20, 120, 200), size=(40, 50)), tmp_path / f"below.{kind}")
    above = write_image(solid_image((20, 120, 200), size=(40, 51)), tmp_path / f"above.{kind}")
    x, ok = load_image(below)
    assert ok and torch.equal(x, pillow_bits(below))
    if kind == "jpeg" and images.simplejpeg is not None:
        assert calls == [1]
    with caplog.at_level(logging.WARNING):
        x, ok = load_image(above)
    assert not ok and torch.equal(x, ZERO_TENSOR)
    assert "DecompressionBombError" in caplog.text
    assert len(calls) <= 1


# ---------------------------------------------------------------------------
# POI tables: counts
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value,want",
    [([1, -2, 0], "negative"), ([-1], "negative"), ([1, float("inf"), 0], "not up to 3 finite counts")],
)
@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_pic_num_counts_must_be_finite_and_not_negative(tmp_path, value, want, fmt):
    table = {"ok": [1, 2, 3], "bad": value}
    path = tmp_path / f"pic.{fmt}"
    if fmt == "npy":
        np.save(path, table, allow_pickle=True)
    else:
        pad = {k: (v + [0, 0, 0])[:3] for k, v in table.items()}
        np.savez(path, names=np.array(list(pad)), values=np.array(list(pad.values())), kind=np.array("pic_num"))
    with pytest.raises(PoiTableError, match=want) as e:
        load_poi_tables(path, None, None, dim=4)
    msg = str(e.value)
    assert msg.startswith("--poi-pic-num: ") and str(path) in msg and "'bad'" in msg


def test_convert_refuses_negative_counts(tmp_path, capsys):
    src = tmp_path / "pic.npy"
    np.save(src, {"西湖": [3, 1, 0], "古镇": [2, -1, 0]}, allow_pickle=True)
    assert poi_tables.main(["convert", "--kind", "pic_num", str(src), str(tmp_path / "pic.npz")]) == 2
    line = one_line(capsys, "poi_tables")
    assert str(src) in line and "'古镇'" in line and "negative" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pic.npy"]


# ---------------------------------------------------------------------------
# truncated or garbage numpy files
# ---------------------------------------------------------------------------
def _broken_npz(tmp_path, how: str) -> Path:
    good = tmp_path / "good.npz"
    save_tables({good: {"西湖": np.ones(8), "古镇": np.zeros(8)}})
    path = tmp_path / f"{how}.npz"
    data = good.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "npy_inside":
        np.save(tmp_path / "x.npy", np.ones((2, 8)))
        (tmp_path / "x.npy").rename(path)
    elif how == "corrupt_compressed":
        np.savez_compressed(
            path, names=np.array(["a", "b"]), values=np.random.default_rng(0).random((2, 300)), kind=np.array("vectors")
        )
        raw = bytearray(path.read_bytes())
        for k in range(200, 220):
            raw[k] ^= 0x55
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("how", ["truncated", "empty", "npy_inside", "corrupt_compressed"])
def test_broken_npz_tables_are_one_line(tmp_path, capsys, how):
    path = _broken_npz(tmp_path, how)
    with pytest.raises(PoiTableError) as e:
        load_poi_tables(None, path, None, dim=8)
    assert str(e.value).startswith("--poi-image-vectors: ") and str(path) in str(e.value)
    assert poi_tables.main(["info", str(path)]) == 2
    assert str(path) in one_line(capsys, "poi_tables")
    assert poi_tables.main(["convert", str(path), str(tmp_path / "out.npy")]) == 2
    assert str(path) in one_line(capsys, "poi_tables")
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("how", ["truncated", "empty", "npy_inside", "corrupt_compressed"])
def test_broken_embeddings_files_are_a_data_error(tmp_path, how):
    path = _broken_npz(tmp_path, how)
    with pytest.raises(DataError, match="not an embeddings file") as e:
        load_embeddings(path)
    assert str(path) in str(e.value)


def test_truncated_npy_tables(tmp_path):
    np.save(tmp_path / "plain.npy", np.ones((100, 3)))
    np.save(tmp_path / "pickled.npy", {"a": np.ones(100)}, allow_pickle=True)
    for name in ("plain.npy", "pickled.npy"):
        data = (tmp_path / name).read_bytes()
        for cut in (0, 5, 60, len(data) // 2):
            path = tmp_path / f"cut{cut}_{name}"
            path.write_bytes(data[:cut])
            for trust in (False, True):
                with pytest.raises(PoiTableError) as e:
                    load_poi_table(path, trust_pickle=trust)
                assert str(path) in str(e.value)


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_a_header_announcing_a_huge_array_is_one_line(tmp_path, fmt):
    """A few bytes whose header claims 745 GiB: an error naming the file, not a MemoryError."""
    npy = tmp_path / "huge.npy"
    with open(npy, "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**11,)})
        f.write(b"\0" * 64)
    path = npy
    if fmt == "npz":
        import zipfile

        path = tmp_path / "huge.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.write(npy, "values.npy")
            z.writestr("names.npy", b"")
    with pytest.raises(PoiTableError) as e:
        load_poi_table(path)
    assert str(path) in str(e.value)


def test_trusted_pickle_that_fails_is_one_line(tmp_path, capsys):
    """--trust-pickle runs the pickle; a global it cannot find is still a one-line error."""
    path = tmp_path / "odd.npy"
    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, npformat.header_data_from_array_1_0(np.empty((), dtype=object)))
        f.write(b"cno_such_module_here\nthing\n(tR.")
    with pytest.raises(PoiTableError, match="odd.npy"):
        load_poi_table(path, trust_pickle=True)
    assert poi_tables.main(["info", "--trust-pickle", str(path)]) == 2
    assert "odd.npy" in one_line(capsys, "poi_tables")


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys):
    path = tmp_path / "t.npz"
    save_tables({path: {"a": [1.0, 2.0]}})
    before = path.read_bytes()
    assert poi_tables.main(["convert", str(path), str(path)]) == 2
    assert "same file" in one_line(capsys, "poi_tables")
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------
# build_poi_tables.py: the one rule for bad rows
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poi_env(tmp_path_factory, bert_dir):
    d = tmp_path_factory.mktemp("bad_poi_rows")
    save_align_checkpoint(tiny_align(bert_dir, seed=4), d / "align.pth")
    for pid, color in (("1", (200, 20, 20)), ("2", (20, 200, 20))):
        write_image(solid_image(color), d / "images" / f"{pid}_1.png")
    good = "1,西湖,http://x/1.jpg,1,96,64,\n2,古镇,http://x/2.jpg,1,96,64,\n"
    (d / "bad.csv").write_bytes(good.encode() + b"3,only,four,fields\n4,\xff\xfe,http://x/4.jpg,1,96,64,\n")
    return d


def _build_args(d: Path, out: Path, bert_dir, *extra: str) -> list[str]:
    return [
        *("--csv", str(d / "bad.csv"), "--image-dir", str(d / "images")),
        *("--checkpoint", str(d / "align.pth"), "--bert-dir", str(bert_dir)),
        *("--out-image-vectors", str(out / "img.npz"), "--out-name-vectors", str(out / "name.npz")),
        *("--device", "cpu", "--backend", "torch", "--num-workers", "0", "--no-progress"),
        *extra,
    ]


def test_build_poi_tables_refuses_bad_rows(poi_env, bert_dir, tmp_path, capsys):
    assert build_poi_tables.main(_build_args(poi_env, tmp_path, bert_dir)) == 2
    line = one_line(capsys, "build_poi_tables")
    assert f"{poi_env / 'bad.csv'}:3: expected 7 fields" in line and "1 more" in line and "--skip-bad-rows" in line
    assert list(tmp_path.iterdir()) == []


def test_build_poi_tables_skips_bad_rows_when_asked(poi_env, bert_dir, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        assert build_poi_tables.main(_build_args(poi_env, tmp_path, bert_dir, "--skip-bad-rows")) == 0
    assert "2 bad rows left out" in capsys.readouterr().out
    assert f"{poi_env / 'bad.csv'}:4: not UTF-8" in caplog.text  # bad bytes at their line
    assert set(load_poi_table(tmp_path / "name.npz")) == {"西湖", "古镇"}
