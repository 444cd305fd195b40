"""Image grids of samples as PNG files (Pillow, imported lazily)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Map [N, C, H, W] images in [-1, 1] to uint8 [N, H, W, C], clipping out-of-range values."""
    scaled = np.clip((np.asarray(images, dtype=np.float64) + 1.0) * 127.5, 0, 255)
    return np.rint(scaled).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(
    images: np.ndarray, columns: int | None = None, padding: int = 2, scale: int = 1
) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 [rows*H', columns*W', C] array."""
    pixels = to_uint8(images)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width, channels = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        dtype=np.uint8,
    )
    for index in range(count):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top : top + height, left : left + width] = pixels[index]
    return grid


def save_grid_png(images: np.ndarray, path: str | Path, scale: int | None = None) -> None:
    """Write a PNG grid; small images are enlarged (nearest neighbour) to at least 64 pixels."""
    from PIL import Image

    from calibexport.exporter.atomic import atomic_write_bytes

    if scale is None:
        scale = max(1, 64 // images.shape[-1])
    grid = make_grid(images, scale=scale)
    mode = "L" if grid.shape[2] == 1 else "RGB"
    image = Image.fromarray(grid[:, :, 0] if mode == "L" else grid, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
