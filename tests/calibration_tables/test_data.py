"""Tests for the data sources of eta estimation: digits, arrays and image folders."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibexport.calibration_tables.data import describe_data, load_data, load_digits
from calibexport.errors import CalibexportError


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_digits_splits() -> None:
    train = load_data("digits", channels=1, resolution=16)
    test = load_data("digits:test", channels=1, resolution=16)
    everything = load_data("digits:all", channels=1, resolution=8)

    assert train.shape == (1617, 1, 16, 16)
    assert test.shape == (180, 1, 16, 16)
    assert everything.shape == (1797, 1, 8, 8)
    assert train.dtype == np.float32
    np.testing.assert_array_equal(train, load_digits("train", 16))
    assert train.min() >= -1.0
    assert train.max() <= 1.0


def test_digits_rejects_three_channels() -> None:
    with pytest.raises(CalibexportError, match="digits data set has 1 channel but .* needs 3"):
        load_data("digits", channels=3, resolution=16)


def test_npy_uint8_nhwc(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    pixels[0, 0, 0] = [0, 255, 128]
    np.save(tmp_path / "images.npy", pixels)
    images = load_data(tmp_path / "images.npy", channels=3, resolution=8)

    assert images.shape == (4, 3, 8, 8)
    assert images.dtype == np.float32
    np.testing.assert_allclose(images[0, :, 0, 0], [-1.0, 1.0, 128 / 127.5 - 1.0], atol=1e-6)
    np.testing.assert_allclose(images, pixels.transpose(0, 3, 1, 2) / 127.5 - 1.0, atol=1e-6)


def test_npy_float_nchw(tmp_path: Path) -> None:
    array = np.random.default_rng(0).uniform(-1, 1, (3, 1, 4, 4))
    np.save(tmp_path / "images.npy", array)
    images = load_data(str(tmp_path / "images.npy"), channels=1, resolution=4)

    np.testing.assert_allclose(images, array.astype(np.float32))


def test_npy_three_dims_single_channel(tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", np.full((2, 4, 4), 0.5, dtype=np.float32) - 1.0)
    images = load_data(tmp_path / "images.npy", channels=1, resolution=4)

    assert images.shape == (2, 1, 4, 4)


def test_npz_key_order(tmp_path: Path) -> None:
    first = np.full((2, 1, 4, 4), -0.5, dtype=np.float32)
    preferred = np.full((3, 1, 4, 4), 0.25, dtype=np.float32) - 0.5
    np.savez(tmp_path / "named.npz", labels=first, x=preferred)
    np.savez(tmp_path / "unnamed.npz", first, preferred)

    np.testing.assert_array_equal(load_data(tmp_path / "named.npz", channels=1, resolution=4),
                                  preferred)
    np.testing.assert_array_equal(load_data(tmp_path / "unnamed.npz", channels=1, resolution=4),
                                  first)


def test_float_range_checks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    np.save(tmp_path / "wide.npy", np.linspace(0, 255, 32).reshape(2, 1, 4, 4))
    with pytest.raises(CalibexportError, match=r"lie in \[0, 255\], outside \[-1, 1\]; rescale"):
        load_data(tmp_path / "wide.npy", channels=1, resolution=4)

    np.save(tmp_path / "unit.npy", np.linspace(0, 1, 32).reshape(2, 1, 4, 4))
    with caplog.at_level(logging.WARNING):
        images = load_data(tmp_path / "unit.npy", channels=1, resolution=4)
    assert "inside [0, 1]" in caplog.text
    assert images.min() == 0.0

    np.save(tmp_path / "rounded.npy", np.full((1, 1, 4, 4), 1.00001))
    assert load_data(tmp_path / "rounded.npy", channels=1, resolution=4).max() == 1.0


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 1, 5, 5), np.float32), r"shape \[2, 1, 5, 5\]; expected \[N, 1, 4, 4\]"),
        (np.zeros((2, 2, 4, 4), np.float32), r"shape \[2, 2, 4, 4\]; expected"),
        (np.zeros((0, 1, 4, 4), np.float32), r"shape \[0, 1, 4, 4\]; expected .* N >= 1"),
        (np.zeros((16,), np.float32), r"shape \[16\]; expected"),
        (np.zeros((2, 1, 4, 4), np.int64), "dtype int64; use uint8"),
    ],
)
def test_array_rejects(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(CalibexportError, match=message):
        load_data(tmp_path / "bad.npy", channels=1, resolution=4)


def test_array_rejects_nan(tmp_path: Path) -> None:
    array = np.zeros((3, 1, 4, 4), np.float32)
    array[1, 0, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", array)
    with pytest.raises(CalibexportError, match="contains NaN or Inf, first in image 1"):
        load_data(tmp_path / "nan.npy", channels=1, resolution=4)


def test_array_file_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.npy").write_bytes(b"garbage")
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "images.txt").write_text("1 2 3")
    np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)

    with pytest.raises(CalibexportError, match="cannot read data file .*broken.npy"):
        load_data(tmp_path / "broken.npy", channels=1, resolution=4)
    with pytest.raises(CalibexportError, match="empty.npz contains no arrays"):
        load_data(tmp_path / "empty.npz", channels=1, resolution=4)
    with pytest.raises(CalibexportError, match="unsupported type '.txt'"):
        load_data(tmp_path / "images.txt", channels=1, resolution=4)
    with pytest.raises(CalibexportError, match="no pickled objects"):
        load_data(tmp_path / "objects.npy", channels=1, resolution=4)
    with pytest.raises(CalibexportError, match="'.*missing.npy' not found"):
        load_data(tmp_path / "missing.npy", channels=1, resolution=4)


def test_folder_rgb_and_gray(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    second = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    save_png(tmp_path / "b" / "second.png", second)
    save_png(tmp_path / "a.png", first)
    (tmp_path / "notes.txt").write_text("not an image")

    rgb = load_data(tmp_path, channels=3, resolution=6)
    gray = load_data(tmp_path, channels=1, resolution=6)

    assert rgb.shape == (2, 3, 6, 6)
    np.testing.assert_allclose(rgb[0], first.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(rgb[1], second.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)
    expected_gray = np.asarray(Image.fromarray(first).convert("L")) / 127.5 - 1.0
    assert gray.shape == (2, 1, 6, 6)
    np.testing.assert_allclose(gray[0, 0], expected_gray, atol=1e-6)


def test_folder_other_formats(tmp_path: Path) -> None:
    pixels = np.full((4, 4), 200, dtype=np.uint8)
    for suffix in ("bmp", "JPG", "webp"):
        Image.fromarray(pixels).save(tmp_path / f"image.{suffix}")

    images = load_data(tmp_path, channels=1, resolution=4)
    assert images.shape == (3, 1, 4, 4)
    np.testing.assert_allclose(images[0], 200 / 127.5 - 1.0, atol=1e-6)


def test_folder_rejects_wrong_size(tmp_path: Path) -> None:
    save_png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    save_png(tmp_path / "wide.png", np.zeros((8, 10), np.uint8))
    with pytest.raises(CalibexportError, match=r"image .*wide.png is 10x8 but the model needs 8x8"):
        load_data(tmp_path, channels=1, resolution=8)


def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "labels.csv").write_text("a,b")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")

    with pytest.raises(CalibexportError, match="data folder .*empty is empty"):
        load_data(empty, channels=1, resolution=4)
    with pytest.raises(CalibexportError, match=r"no images .*1 other files such as 'labels.csv'"):
        load_data(other, channels=1, resolution=4)
    with pytest.raises(CalibexportError, match=r"cannot read image .*x.png"):
        load_data(broken, channels=1, resolution=4)
    with pytest.raises(CalibexportError, match="1 .L. or 3 .RGB. channels but the model needs 4"):
        load_data(other, channels=4, resolution=4)


def test_describe_data(tmp_path: Path) -> None:
    digits = load_data("digits:test", channels=1, resolution=8)
    described = describe_data("digits:test", digits)
    np.save(tmp_path / "images.npy", digits)
    from_file = describe_data(tmp_path / "images.npy", digits)

    assert described["source"] == "digits:test"
    assert described["kind"] == "digits"
    assert described["split"] == "test"
    assert described["num_images"] == 180
    assert described["image_shape"] == [1, 8, 8]
    assert described["sha256"] == from_file["sha256"]
    assert from_file["kind"] == "npy"
    assert from_file["source"] == str((tmp_path / "images.npy").resolve())
    assert describe_data(tmp_path, digits)["kind"] == "image_folder"
