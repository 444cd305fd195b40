"""Data sources for eta estimation: image folders, .npy/.npz arrays and scikit-learn's digits.

Every source returns float32 images ``[N, C, H, W]`` scaled to [-1, 1], the range the
networks were trained on.
"""

from __future__ import annotations

import logging
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError

# Fixed split of scikit-learn's 1797 digits: the demo model trains on the first part of this
# permutation and held-out checks use the rest.
DIGITS_SPLIT_SEED = 20231
DIGITS_HOLDOUT = 180

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Keys tried in order in an .npz file before falling back to its first array.
ARRAY_KEYS = ("images", "x", "data")
DIGITS_SOURCES = {
    "digits": "train",
    "digits:train": "train",
    "digits:test": "test",
    "digits:all": "all",
}
# Float data may exceed [-1, 1] by this much (rounding in a conversion) and is then clipped.
RANGE_TOLERANCE = 1e-4


def load_digits(split: str = "train", resolution: int = 16) -> np.ndarray:
    """Return scikit-learn's handwritten digits as [N, 1, resolution, resolution] in [-1, 1].

    The 8x8 images (values 0..16) are upsampled bilinearly. ``split`` is ``train`` (1617
    images), ``test`` (the 180 held-out images) or ``all``.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sklearn_digits

    if split not in ("train", "test", "all"):
        raise CalibexportError(f"unknown digits split {split!r}; valid: train, test, all.")
    images = sklearn_digits().images.astype(np.float32) / 16.0
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    if split == "train":
        images = images[order[DIGITS_HOLDOUT:]]
    elif split == "test":
        images = images[order[:DIGITS_HOLDOUT]]
    tensor = torch.from_numpy(images)[:, None]
    if resolution != 8:
        tensor = F.interpolate(tensor, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (tensor.clamp(0.0, 1.0) * 2.0 - 1.0).numpy().astype(np.float32)



def load_data(source: str | Path, *, channels: int, resolution: int) -> np.ndarray:
    """Load images for eta estimation as float32 [N, C, H, W] in [-1, 1].

    ``source`` is ``digits`` (the train split), ``digits:test``, ``digits:all``, a ``.npy`` or
    ``.npz`` file, or a folder of images (searched recursively). Images must already be
    ``resolution`` x ``resolution`` with ``channels`` channels (1 or 3 for folders): nothing is
    resized. Arrays may be NCHW or NHWC; uint8 is scaled from [0, 255]. Float data must lie in
    [-1, 1]. Float data that lie entirely in [0, 1] are used as they are, with a warning,
    because that range is also valid in [-1, 1].
    """
    if channels < 1 or resolution < 1:
        raise CalibexportError(
            f"channels and resolution must be positive, got channels={channels}, "
            f"resolution={resolution}."
        )
    text = str(source)
    if text in DIGITS_SOURCES:
        if channels != 1:
            raise CalibexportError(
                f"the digits data set has 1 channel but the model needs {channels}; "
                "use a data set with matching channels."
            )
        images = load_digits(DIGITS_SOURCES[text], resolution)
    else:
        path = Path(source)
        if not path.exists():
            raise CalibexportError(
                f"data source {text!r} not found; pass an existing .npy/.npz file, an image "
                f"folder, or one of: {', '.join(DIGITS_SOURCES)}."
            )
        if path.is_dir():
            images = _load_image_folder(path, channels, resolution)
        elif path.suffix.lower() in (".npy", ".npz"):
            images = _array_to_images(_read_array(path), path, channels, resolution)
        else:
            raise CalibexportError(
                f"data file {path} has an unsupported type {path.suffix!r}; pass a .npy or .npz "
                "array or a folder of images."
            )
    logger.info("Loaded %d images %s from %s.", len(images), list(images.shape[1:]), text)
    return images


def describe_data(source: str | Path, array: np.ndarray) -> dict[str, Any]:
    """Describe loaded data for the eta sidecar: the source, its kind, the count and a digest."""
    from calibexport.hashing import sha256_array

    text = str(source)
    if text in DIGITS_SOURCES:
        kind = "digits"
        split = DIGITS_SOURCES[text]
    else:
        path = Path(source)
        kind = "image_folder" if path.is_dir() else path.suffix.lower().lstrip(".")
        split = None
        text = str(path.resolve())
    description: dict[str, Any] = {
        "source": text,
        "kind": kind,
        "num_images": int(array.shape[0]),
        "image_shape": [int(dim) for dim in array.shape[1:]],
        "sha256": sha256_array(np.asarray(array, dtype=np.float32)),
    }
    if split is not None:
        description["split"] = split
        description["split_seed"] = DIGITS_SPLIT_SEED
    return description


# Exceptions np.load raises for a damaged .npy or .npz, because numpy parses headers with tokenize and ast, a
# damaged shape can request more memory than exists, and zip members can fail their CRC-32.
_DAMAGED_FILE_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError,
                        MemoryError, zipfile.BadZipFile, zlib.error)


def _read_array(path: Path) -> np.ndarray:
    try:
        # For a .npy file a memory map checks the header's shape against the file size first.
        loaded = np.load(path, allow_pickle=False, mmap_mode="r")
    except _DAMAGED_FILE_ERRORS as error:
        raise CalibexportError(
            f"cannot read data file {path}: {error}; save the images with numpy.save or "
            "numpy.savez (no pickled objects)."
        ) from error
    if isinstance(loaded, np.ndarray):
        return np.array(loaded)
    with loaded:
        names = list(loaded.files)
        if not names:
            raise CalibexportError(f"data file {path} contains no arrays.")
        name = next((key for key in ARRAY_KEYS if key in names), names[0])
        if name not in ARRAY_KEYS and len(names) > 1:
            logger.info("Using array %r of %s (arrays: %s).", name, path, ", ".join(names))
        try:
            return loaded[name]
        except _DAMAGED_FILE_ERRORS as error:
            raise CalibexportError(f"cannot read array {name!r} of {path}: {error}.") from error


def _array_to_images(array: np.ndarray, path: Path, channels: int, resolution: int) -> np.ndarray:
    """Convert an array to float32 NCHW in [-1, 1], checking its layout, size and range."""
    size = f"{resolution}, {resolution}"
    expected = f"[N, {channels}, {size}] or [N, {size}, {channels}]"
    if array.ndim == 3 and channels == 1:
        array = array[:, None]
    if array.ndim != 4:
        raise CalibexportError(
            f"data array in {path} has shape {list(array.shape)}; expected {expected}."
        )
    if array.shape[-1] == channels and array.shape[1] != channels:
        array = array.transpose(0, 3, 1, 2)
    if tuple(array.shape[1:]) != (channels, resolution, resolution) or len(array) == 0:
        raise CalibexportError(
            f"data array in {path} has shape {list(array.shape)}; expected {expected} with N >= 1. "
            "Resize the images to the model's resolution before calibrating."
        )
    return _scale_to_unit_range(array, str(path))


def _scale_to_unit_range(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise CalibexportError(
            f"data in {where} has dtype {array.dtype}; use uint8 in [0, 255] or float in [-1, 1]."
        )
    images = np.ascontiguousarray(array, dtype=np.float32)
    if not np.all(np.isfinite(images)):
        bad = int(np.argmin(np.isfinite(images).reshape(len(images), -1).all(axis=1)))
        raise CalibexportError(f"data in {where} contains NaN or Inf, first in image {bad}.")
    low, high = float(images.min()), float(images.max())
    if low < -1.0 - RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise CalibexportError(
            f"float data in {where} lie in [{low:.4g}, {high:.4g}], outside [-1, 1]; rescale "
            "them first (x * 2 - 1 for [0, 1] data, x / 127.5 - 1 for [0, 255] data)."
        )
    if low >= 0.0:
        logger.warning(
            "Float data in %s lie in [%.3g, %.3g], inside [0, 1]; they are used as [-1, 1] "
            "data. If they are [0, 1] images, rescale them with x * 2 - 1.",
            where, low, high,
        )
    return np.clip(images, -1.0, 1.0)


def _load_image_folder(folder: Path, channels: int, resolution: int) -> np.ndarray:
    """Read every image under ``folder`` (sorted by path) into float32 NCHW in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise CalibexportError(
            f"image folders give 1 (L) or 3 (RGB) channels but the model needs {channels}; "
            "pass the data as a .npy array instead."
        )
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        raise CalibexportError(f"data folder {folder} is empty; add images or pass another source.")
    images = [path for path in files if path.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise CalibexportError(
            f"data folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)}); "
            f"found {len(files)} other files such as {files[0].name!r}."
        )

    mode = "L" if channels == 1 else "RGB"
    pixels = np.empty((len(images), resolution, resolution, channels), dtype=np.uint8)
    converted_modes: dict[str, Path] = {}
    for index, path in enumerate(images):
        try:
            with Image.open(path) as image:
                if image.size != (resolution, resolution):
                    raise CalibexportError(
                        f"image {path} is {image.size[0]}x{image.size[1]} but the model needs "
                        f"{resolution}x{resolution}; resize the images first (no resizing is "
                        "done here)."
                    )
                color_bands = [band for band in image.getbands() if band != "A"]
                if image.mode != "P" and len(color_bands) != channels:
                    converted_modes.setdefault(image.mode, path)
                converted = np.asarray(image.convert(mode), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as error:
            raise CalibexportError(f"cannot read image {path}: {error}.") from error
        pixels[index] = converted.reshape(resolution, resolution, channels)
    if converted_modes:
        logger.warning(
            "Converted images of mode %s in %s (first: %s) to %s for the %d-channel model; "
            "convert them yourself if another channel mapping is needed.",
            ", ".join(sorted(converted_modes)), folder,
            ", ".join(str(p) for p in converted_modes.values()), mode, channels,
        )
    return _scale_to_unit_range(pixels.transpose(0, 3, 1, 2), str(folder))
