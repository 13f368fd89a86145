"""Reference preprocessing (SPEC section 3) checked against Pillow + OpenCV called directly."""

import logging

import cv2
import numpy as np
import pytest
import torch
from fixtures import solid_image
from PIL import Image
from torch.utils.data import DataLoader

from utils.formats.images import ZERO_TENSOR, ImageDataset, load_image

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def direct(path):
    """SPEC section 3 written out without the package."""
    img = np.array(Image.open(path).convert("RGB"))
    img = cv2.resize(img, (224, 224))
    img = (img / 255.0 - MEAN) / STD
    return torch.from_numpy(np.transpose(img, (2, 0, 1)).astype(np.float32))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (333, 517, 3), dtype=np.uint8))
    files = {}
    noise.save(d / "photo.jpg", quality=90)
    files["jpeg"] = d / "photo.jpg"
    rgba = Image.fromarray(rng.integers(0, 256, (150, 90, 4), dtype=np.uint8), "RGBA")
    rgba.save(d / "alpha.png")
    files["png_alpha"] = d / "alpha.png"
    noise.convert("L").save(d / "grey.png")
    files["grey"] = d / "grey.png"
    noise.convert("P").save(d / "palette.gif")
    files["palette"] = d / "palette.gif"
    solid_image((10, 200, 30), size=(2000, 40)).save(d / "noext", format="JPEG")
    files["no_extension"] = d / "noext"
    data = (d / "photo.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    files["truncated"] = d / "truncated.jpg"
    (d / "page.jpg").write_bytes(b"<html>not an image</html>")
    files["html"] = d / "page.jpg"
    return files


@pytest.mark.parametrize("kind", ["jpeg", "png_alpha", "grey", "palette", "no_extension"])
def test_reference_matches_direct(generated, kind):
    x, ok = load_image(generated[kind])
    assert ok and x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(x, direct(generated[kind]))


@pytest.mark.parametrize("kind", ["truncated", "html"])
def test_unreadable_becomes_zero_image_and_is_logged(generated, kind, caplog):
    with caplog.at_level(logging.WARNING):
        x, ok = load_image(generated[kind])
    assert not ok
    assert str(generated[kind]) in caplog.text
    want = torch.from_numpy(((0 - MEAN) / STD).astype(np.float32))[:, None, None].expand(3, 224, 224)
    assert torch.allclose(x, want) and torch.equal(x, ZERO_TENSOR)


def test_missing_file_is_unreadable(tmp_path):
    x, ok = load_image(tmp_path / "absent.jpg")
    assert not ok and torch.equal(x, ZERO_TENSOR)


def test_fast_mode_is_close_and_identical_for_png(generated, tmp_path):
    big = solid_image((200, 100, 50), size=(1600, 1200), shape="圆")
    big.save(tmp_path / "big.jpg", quality=90)
    ref, _ = load_image(tmp_path / "big.jpg", "reference")
    fast, ok = load_image(tmp_path / "big.jpg", "fast")
    assert ok and (ref - fast).abs().mean() < 0.05
    assert torch.equal(load_image(generated["grey"], "fast")[0], load_image(generated["grey"])[0])
    with pytest.raises(ValueError, match="preprocess mode"):
        load_image(generated["grey"], "sloppy")


def test_dataset_with_worker_processes(generated):
    paths = [generated[k] for k in ("jpeg", "truncated", "grey", "png_alpha")]
    loader = DataLoader(ImageDataset(paths), batch_size=3, num_workers=2)
    xs, oks, idx = zip(*[(x, ok, i) for x, ok, i in loader])
    x, ok, idx = torch.cat(xs), torch.cat(oks), torch.cat(idx)
    assert ok.tolist() == [True, False, True, True] and idx.tolist() == [0, 1, 2, 3]
    assert torch.equal(x[0], direct(paths[0])) and torch.equal(x[1], ZERO_TENSOR)


def test_transform_applied_before_resize(generated):
    flip = lambda im: im.transpose(Image.FLIP_LEFT_RIGHT)  # noqa: E731
    x, ok = ImageDataset([generated["jpeg"]], transform=flip)[0][:2]
    img = np.array(Image.open(generated["jpeg"]).convert("RGB"))[:, ::-1]
    want = (cv2.resize(np.ascontiguousarray(img), (224, 224)) / 255.0 - MEAN) / STD
    assert ok and torch.equal(x, torch.from_numpy(want.transpose(2, 0, 1).astype(np.float32)))


def test_sample_images_match_direct(seed_data):
    paths = sorted((seed_data / "sample-images").glob("*"))
    if not paths:
        pytest.skip("no sample images in seed data")
    for p in paths:
        x, ok = load_image(p)
        assert ok and torch.equal(x, direct(p)), p.name


# --- the libjpeg-turbo path (utils.images.decode_rgb) against Pillow, bit for bit ----------
def _photo(rng, w, h):
    """Smooth gradients plus noise: compresses like a photo, exercises every DCT band."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpeg_kinds(tmp_path_factory):
    """JPEGs of every kind the catalogues hold, and the broken ones."""
    d = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(1)
    big, odd = _photo(rng, 1201, 797), _photo(rng, 37, 23)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate; the reference ignores it
    made = {
        "444": (big, dict(quality=92, subsampling=0)),
        "422": (big, dict(quality=85, subsampling=1)),
        "420": (big, dict(quality=75, subsampling=2)),
        "progressive": (big, dict(quality=80, progressive=True)),
        "optimized": (big, dict(quality=95, optimize=True)),
        "odd_size": (odd, dict(quality=90)),
        "one_pixel": (_photo(rng, 1, 1), dict()),
        "tall": (_photo(rng, 9, 700), dict(subsampling=2)),
        "grey": (big.convert("L"), dict(quality=88)),
        "cmyk": (big.convert("CMYK"), dict(quality=90)),
        "exif_rotated": (big, dict(quality=90, exif=exif.tobytes())),
        "icc": (big, dict(quality=90, icc_profile=b"\0" * 128)),
    }
    files = {}
    for name, (im, kw) in made.items():
        files[name] = d / f"{name}.jpg"
        im.save(files[name], "JPEG", **kw)
    data = files["420"].read_bytes()
    files["trailing_bytes"] = d / "trailing.jpg"
    files["trailing_bytes"].write_bytes(data + b"\0garbage after the end marker")
    files["truncated"] = d / "truncated.jpg"
    files["truncated"].write_bytes(data[: len(data) * 2 // 3])
    files["cut_with_end_marker"] = d / "cut_eoi.jpg"  # libjpeg warns, Pillow decodes it anyway
    files["cut_with_end_marker"].write_bytes(data[: len(data) * 2 // 3] + b"\xff\xd9")
    corrupt = bytearray(data)
    for k in range(len(data) // 2, len(data) // 2 + 40, 7):  # damage the entropy-coded data
        corrupt[k] ^= 0x5A
    files["corrupt"] = d / "corrupt.jpg"
    files["corrupt"].write_bytes(bytes(corrupt))
    files["png_named_jpg"] = d / "png.jpg"
    big.save(files["png_named_jpg"], "PNG")
    return files


def _reference_or_none(path):
    from utils.formats.images import reference_rgb, to_tensor

    try:
        return to_tensor(reference_rgb(path))
    except Exception:  # noqa: BLE001  (the reference's own failure: a zero image)
        return None


@pytest.mark.parametrize(
    "kind",
    [
        "444",
        "422",
        "420",
        "progressive",
        "optimized",
        "odd_size",
        "one_pixel",
        "tall",
        "grey",
        "cmyk",
        "exif_rotated",
        "icc",
        "trailing_bytes",
        "truncated",
        "cut_with_end_marker",
        "corrupt",
        "png_named_jpg",
    ],
)
def test_fast_decoder_gives_pillow_bits(jpeg_kinds, kind):
    want = _reference_or_none(jpeg_kinds[kind])
    x, ok = load_image(jpeg_kinds[kind])
    if want is None:
        assert not ok and torch.equal(x, ZERO_TENSOR)
    else:
        assert ok and torch.equal(x, want)
    if kind in ("444", "progressive", "grey", "odd_size"):
        assert torch.equal(x, direct(jpeg_kinds[kind]))  # and the SPEC written out


def test_fast_decoder_is_used_and_falls_back(jpeg_kinds, monkeypatch):
    """The photos go through libjpeg-turbo; without simplejpeg everything is Pillow's,
    with the same bits."""
    import utils.formats.images as images

    if images.simplejpeg is None:
        pytest.skip("simplejpeg is not installed: Pillow decodes everything")
    calls = []
    real = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = {k: load_image(p)[0] for k, p in jpeg_kinds.items()}
    assert len(calls) >= 8  # the YCbCr and grey ones (cmyk and png never reach it)
    monkeypatch.setattr(images, "simplejpeg", None)
    for k, p in jpeg_kinds.items():
        assert torch.equal(load_image(p)[0], fast[k]), k


def test_scratch_buffer_is_not_shared_with_callers(jpeg_kinds):
    """decode_rgb without scratch returns an array the next decode leaves alone."""
    from utils.formats.images import decode_rgb

    a = decode_rgb(jpeg_kinds["420"])
    keep = a.copy()
    decode_rgb(jpeg_kinds["444"], scratch=True)
    decode_rgb(jpeg_kinds["odd_size"], scratch=True)
    assert np.array_equal(a, keep)


def test_fast_decoder_on_the_real_photos(seed_data):
    """The seed data's real catalogue photos: same bits as Pillow."""
    photos = sorted((seed_data / "sample-images").glob("*.jpg"))
    if not photos:
        pytest.skip(f"no sample photos under {seed_data / 'sample-images'}")
    for p in photos:
        assert torch.equal(load_image(p)[0], _reference_or_none(p)), p
