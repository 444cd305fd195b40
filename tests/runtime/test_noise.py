import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.runtime.noise import initial_noise


def test_noise_shape_and_dtype():
    noise = initial_noise(7, [0, 1, 2], (3, 4, 4))
    assert noise.shape == (3, 3, 4, 4)
    assert noise.dtype == np.float32


def test_noise_independent_of_batch_split():
    whole = initial_noise(11, np.arange(6), (1, 2, 2))
    first = initial_noise(11, [0, 1, 2], (1, 2, 2))
    second = initial_noise(11, [3, 4, 5], (1, 2, 2))
    np.testing.assert_array_equal(np.concatenate([first, second]), whole)


def test_noise_independent_of_position():
    whole = initial_noise(11, np.arange(6), (1, 2, 2))
    shuffled = initial_noise(11, [5, 2, 0], (1, 2, 2))
    np.testing.assert_array_equal(shuffled, whole[[5, 2, 0]])


def test_noise_differs_between_seeds_and_indices():
    a = initial_noise(0, [0, 1], (8,))
    b = initial_noise(1, [0, 1], (8,))
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b[0])


def test_noise_is_standard_normal():
    noise = initial_noise(3, np.arange(64), (32, 32))
    assert abs(float(noise.mean())) < 0.01
    assert abs(float(noise.std()) - 1.0) < 0.01


def test_noise_empty_indices():
    assert initial_noise(0, [], (2, 2)).shape == (0, 2, 2)


@pytest.mark.parametrize(
    ("seed", "indices", "match"),
    [
        (-1, [0], "seed=-1"),
        (1.5, [0], "seed=1.5"),
        (0, [-2], "non-negative, got -2"),
        (0, [0.5], "integers"),
        (0, [[0, 1]], "1-D"),
    ],
)
def test_noise_rejects_bad_input(seed, indices, match):
    with pytest.raises(CalibexportError, match=match):
        initial_noise(seed, indices, (2,))
