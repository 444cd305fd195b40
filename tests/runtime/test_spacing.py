import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import LinearVPSchedule
from calibexport.runtime.spacing import SPACINGS, time_grid


@pytest.mark.parametrize("spacing", SPACINGS)
def test_grid_ends_and_monotone(ddpm_schedule, spacing):
    grid = time_grid(ddpm_schedule, spacing, 12, 0.9, 2e-3)
    assert grid.dtype == np.float64
    assert grid.shape == (13,)
    assert grid[0] == 0.9
    assert grid[-1] == 2e-3
    assert np.all(np.diff(grid) < 0)


def test_logsnr_grid_equal_in_lambda(ddpm_schedule):
    grid = time_grid(ddpm_schedule, "logSNR", 10, 1.0, 1e-3)
    steps = np.diff(ddpm_schedule.lambda_(grid))
    np.testing.assert_allclose(steps, steps.mean(), rtol=1e-9)


def test_uniform_grid_equal_in_time(ddpm_schedule):
    grid = time_grid(ddpm_schedule, "time_uniform", 4, 1.0, 0.2)
    np.testing.assert_allclose(grid, [1.0, 0.8, 0.6, 0.4, 0.2], rtol=1e-12)


def test_quadratic_grid_equal_in_sqrt_time():
    grid = time_grid(LinearVPSchedule(), "time_quadratic", 3, 1.0, 0.01)
    np.testing.assert_allclose(np.sqrt(grid), [1.0, 0.7, 0.4, 0.1], rtol=1e-12)


def test_grid_rejects_unknown_spacing(ddpm_schedule):
    with pytest.raises(CalibexportError, match="unknown spacing 'karras'.*logSNR"):
        time_grid(ddpm_schedule, "karras", 10, 1.0, 1e-3)


def test_grid_rejects_zero_intervals(ddpm_schedule):
    with pytest.raises(CalibexportError, match="num_intervals=0"):
        time_grid(ddpm_schedule, "logSNR", 0, 1.0, 1e-3)


def test_grid_rejects_reversed_ends(ddpm_schedule):
    with pytest.raises(CalibexportError, match="t_end=0.5 must be smaller than t_start=0.5"):
        time_grid(ddpm_schedule, "time_uniform", 4, 0.5, 0.5)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_grid_rejects_collapsed_times(ddpm_schedule, spacing):
    t_start = 0.5
    t_end = np.nextafter(np.nextafter(t_start, 0.0), 0.0)
    with pytest.raises(CalibexportError, match="time grid collapses: t=0.5"):
        time_grid(ddpm_schedule, spacing, 10, t_start, t_end)
