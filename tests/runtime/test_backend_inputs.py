"""EpsBackend.eps: the input checks that every backend runs before calling its engine."""

from __future__ import annotations

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.runtime.backends.base import EpsBackend


class Recording(EpsBackend):
    """A backend that returns x + timestep and records what reached it."""

    name = "recording"

    def __init__(self, timestep_dtype) -> None:
        self.image_shape = (1, 2, 2)
        self.timestep_dtype = np.dtype(timestep_dtype)
        self.seen: list[np.ndarray] = []

    def _eps(self, x, timestep):
        self.seen.append(timestep)
        return x + timestep.astype(np.float32).reshape(-1, 1, 1, 1)


X = np.zeros((2, 1, 2, 2), np.float32)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32])
@pytest.mark.parametrize("values", [[10.5 + 0j, 500], [1 + 3j, 2]])
def test_complex_timesteps_rejected(dtype, values):
    with pytest.raises(CalibexportError, match="real number array"):
        Recording(dtype).eps(X, np.array(values, dtype=complex))


@pytest.mark.parametrize("values", [np.array(["1", "2"]), np.array([1, 2], dtype=object)])
def test_string_and_object_timesteps_rejected(values):
    with pytest.raises(CalibexportError, match="real number array"):
        Recording(np.float32).eps(X, values)


def test_empty_batch_rejected():
    with pytest.raises(CalibexportError, match="batch size 0"):
        Recording(np.float32).eps(np.zeros((0, 1, 2, 2), np.float32), np.zeros(0))


@pytest.mark.parametrize("values, dtype, model_dtype", [
    ([2**40 + 10, 500], np.int64, np.int32),
    ([1e10, 5.0], np.float64, np.int32),
    ([2**63, 1], np.uint64, np.int64),
    ([-1, 3], np.int64, np.uint8),
])
def test_timesteps_outside_integer_input_rejected(values, dtype, model_dtype):
    backend = Recording(model_dtype)
    with pytest.raises(CalibexportError, match="do not fit the model's"):
        backend.eps(X, np.array(values, dtype=dtype))
    assert backend.seen == []


@pytest.mark.parametrize("values", [[True, False], [3, 7], [3.0, 7.0]])
def test_valid_timesteps_reach_integer_model(values):
    backend = Recording(np.int32)
    out = backend.eps(X, np.array(values))
    assert backend.seen[0].dtype == np.int32
    np.testing.assert_array_equal(backend.seen[0], np.array(values).astype(np.int32))
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.array(values, dtype=np.float32))


def test_float_model_gets_input_without_copy():
    backend = Recording(np.float32)
    timestep = np.array([0.5, 1.5], np.float32)
    backend.eps(X, timestep)
    assert backend.seen[0] is timestep
