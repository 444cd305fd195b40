import numpy as np
from PIL import Image

from calibexport.imaging import make_grid, save_grid_png, to_uint8


def test_to_uint8_maps_range_and_clips():
    images = np.array([-1.0, 0.0, 1.0, 5.0], dtype=np.float32).reshape(1, 1, 2, 2)
    pixels = to_uint8(images)
    assert pixels.shape == (1, 2, 2, 1)
    assert pixels.ravel().tolist() == [0, 128, 255, 255]


def test_grid_places_each_image():
    images = np.stack([np.full((1, 3, 3), value) for value in (-1.0, 1.0, -1.0)]).astype(np.float32)
    grid = make_grid(images, columns=2, padding=1)
    assert grid.shape == (2 * 4 + 1, 2 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0
    assert grid[1, 5, 0] == 255
    assert grid[5, 1, 0] == 0


def test_save_grid_png_writes_readable_file(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (5, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "grid.png"
    save_grid_png(images, path, scale=2)
    with Image.open(path) as image:
        assert image.mode == "RGB"
        assert image.size == (3 * 18 + 2, 2 * 18 + 2)
