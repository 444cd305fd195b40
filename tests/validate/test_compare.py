import numpy as np
import pytest

from calibexport.validate.compare import Tolerance, error_stats, run_check


def test_identical_arrays_have_zero_error():
    reference = np.random.default_rng(0).standard_normal((3, 2, 4, 4))
    stats = error_stats(reference.copy(), reference, rtol=0.0)
    assert stats.max_abs == 0.0
    assert stats.smallest_passing_atol == 0.0
    assert stats.cosine_similarity == pytest.approx(1.0)


def test_smallest_passing_atol_is_tight():
    reference = np.zeros((4, 1, 2, 2))
    actual = reference.copy()
    actual[2, 0, 1, 1] = 3e-4
    tolerance = Tolerance(atol=1e-4, rtol=0.0)
    check = run_check("c", "evaluation", "", actual, reference, tolerance, timesteps=np.array([5, 6, 7, 8]))
    assert not check.passed
    assert check.stats.smallest_passing_atol == pytest.approx(3e-4)
    assert check.worst_timestep == 7.0
    loose = run_check("c", "evaluation", "", actual, reference, Tolerance(atol=3e-4, rtol=0.0))
    assert loose.passed


def test_rtol_scales_with_reference():
    reference = np.full((2, 1, 1, 1), 100.0)
    actual = reference + 0.05
    check = run_check("c", "evaluation", "", actual, reference, Tolerance(atol=0.0, rtol=1e-3))
    assert check.passed
    assert check.stats.smallest_passing_atol == 0.0


def test_nan_fails_even_with_huge_tolerance():
    reference = np.zeros((2, 1, 2, 2))
    actual = reference.copy()
    actual[1, 0, 0, 0] = np.nan
    check = run_check("c", "evaluation", "", actual, reference, Tolerance(atol=1e9, rtol=1e9),
                      timesteps=np.array([0.0, 42.0]))
    assert check.stats.nan_count == 1
    assert not check.passed
    assert check.worst_timestep == 42.0
    assert "NaN 1" in check.failure_message()
