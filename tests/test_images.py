"""Reference preprocessing (SPEC section 3) checked against Pillow + OpenCV called directly."""
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fixtures import solid_image
from utils.images import ZERO_TENSOR, ImageDataset, load_image

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
    noise.save(d / "photo.jpg", quality=90); files["jpeg"] = d / "photo.jpg"
    rgba = Image.fromarray(rng.integers(0, 256, (150, 90, 4), dtype=np.uint8), "RGBA")
    rgba.save(d / "alpha.png"); files["png_alpha"] = d / "alpha.png"
    noise.convert("L").save(d / "grey.png"); files["grey"] = d / "grey.png"
    noise.convert("P").save(d / "palette.gif"); files["palette"] = d / "palette.gif"
    solid_image((10, 200, 30), size=(2000, 40)).save(d / "noext", format="JPEG"); files["no_extension"] = d / "noext"
    data = (d / "photo.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2]); files["truncated"] = d / "truncated.jpg"
    (d / "page.jpg").write_bytes(b"<html>not an image</html>"); files["html"] = d / "page.jpg"
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
