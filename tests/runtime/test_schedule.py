"""Schedule values checked against the reference DPM-Solver conventions."""

from __future__ import annotations

import numpy as np
import pytest

from calibexport.runtime.schedule import DiscreteVPSchedule, LinearVPSchedule
from calibexport.runtime.solvers import solve
from calibexport.runtime.spacing import time_grid

# Times the fast singlestep order-3 solver queries at NFE 20 on the continuous linear schedule
# (beta_0 = 0.1, beta_1 = 20), logSNR spacing, t_end = 1e-4, in the published calibrated runs.
PUBLISHED_LINEAR_TIMES = np.array(
    [
        1.0, 0.94730, 0.89151, 0.83204, 0.76808, 0.69853, 0.62198, 0.53674, 0.44176, 0.33928,
        0.23886, 0.15480, 0.094623, 0.055695, 0.031752, 0.017398, 0.0089958, 0.0042846,
        0.0018493, 0.00045066,
    ]
)


def _queried_times(schedule, **kwargs) -> np.ndarray:
    times = []

    def eps_fn(x, t):
        times.append(float(t[0]))
        return np.zeros_like(x)

    solve(eps_fn, np.zeros((1, 1, 1, 1)), schedule, **kwargs)
    return np.array(times)


def _round_significant(values: np.ndarray, digits: int = 5) -> np.ndarray:
    return np.array([float(f"{v:.{digits}g}") for v in values])


def test_ddpm_lambda_values(ddpm_schedule):
    assert float(ddpm_schedule.lambda_(1.0)) == pytest.approx(-5.058837, abs=1e-5)
    assert float(ddpm_schedule.lambda_(1e-3)) == pytest.approx(4.605120, abs=1e-5)


def test_ddpm_logsnr_outer_grid(ddpm_schedule):
    # Singlestep order 3 at NFE 20 uses K = 20 // 3 + 1 = 7 intervals equal in lambda.
    grid = time_grid(ddpm_schedule, "logSNR", 7, 1.0, 1e-3)
    expected = [1, 0.852498, 0.673956, 0.440985, 0.178401, 0.045487, 0.008859, 0.001]
    np.testing.assert_allclose(grid, expected, rtol=0, atol=1e-5)


def test_ddpm_outer_grid_model_inputs(ddpm_schedule):
    grid = time_grid(ddpm_schedule, "logSNR", 7, 1.0, 1e-3)
    expected = [999, 851.498, 672.956, 439.985, 177.401, 44.487, 7.859, 0]
    # The published inputs carry 3 decimals, so they match to half a unit of the last digit.
    np.testing.assert_allclose(ddpm_schedule.t_to_timestep(grid), expected, rtol=0, atol=5e-4)


def test_ddpm_solver_queries_outer_grid(ddpm_schedule):
    times = _queried_times(ddpm_schedule, steps=20, order=3)
    grid = time_grid(ddpm_schedule, "logSNR", 7, 1.0, 1e-3)
    np.testing.assert_array_equal(times[::3], grid[:-1])


@pytest.mark.parametrize(
    "schedule", [DiscreteVPSchedule.linear(), LinearVPSchedule()], ids=["ddpm", "linear"]
)
def test_inverse_lambda_round_trip(schedule):
    t = np.concatenate([np.geomspace(2e-3, 1.0, 200), [1e-3, 0.5, 1.0]])
    np.testing.assert_allclose(schedule.inverse_lambda(schedule.lambda_(t)), t, rtol=1e-9, atol=0)


def test_ddpm_extrapolates_outside_table(ddpm_schedule):
    t_array, log_alpha_array = ddpm_schedule.t_array, ddpm_schedule.log_alpha_array
    below = 0.5e-3
    slope = (log_alpha_array[1] - log_alpha_array[0]) / (t_array[1] - t_array[0])
    expected = log_alpha_array[0] + (below - t_array[0]) * slope
    assert float(ddpm_schedule.log_alpha(below)) == pytest.approx(expected, rel=1e-12)
    clamped = float(np.interp(below, t_array, log_alpha_array))
    assert float(ddpm_schedule.log_alpha(below)) != clamped


def test_ddpm_extrapolates_above_one(ddpm_schedule):
    t_array, log_alpha_array = ddpm_schedule.t_array, ddpm_schedule.log_alpha_array
    slope = (log_alpha_array[-1] - log_alpha_array[-2]) / (t_array[-1] - t_array[-2])
    expected = log_alpha_array[-1] + 0.01 * slope
    assert float(ddpm_schedule.log_alpha(1.01)) == pytest.approx(expected, rel=1e-12)
    assert float(ddpm_schedule.log_alpha(1.01)) < log_alpha_array[-1]


def test_linear_schedule_queried_times_float64():
    # In float64 the queried times agree with the published ones to 0.25 %. The published run
    # computed lambda(t) = log_alpha - 0.5 log(1 - exp(2 log_alpha)) in float32, which at
    # t = 1e-4 cancels (1 - exp(-1e-5)) and moves lambda(t_end) from 5.75151 to 5.75281.
    times = _queried_times(LinearVPSchedule(), steps=20, order=3, t_end=1e-4)
    assert times.shape == (20,)
    np.testing.assert_allclose(times, PUBLISHED_LINEAR_TIMES, rtol=2.5e-3, atol=0)


def test_linear_schedule_queried_times_float32_endpoint():
    # Ending the same equal-lambda grid at the float32 value of lambda(1e-4) reproduces the
    # first 16 published times to 5 significant digits. The last 4 lie in the final two steps,
    # whose float32 lambda at t < 0.02 loses 4-7 digits to the same cancellation, so they only
    # agree to 0.25 %.
    schedule = LinearVPSchedule()
    log_alpha = np.float32(schedule.log_alpha(1e-4))
    one, two, half = np.float32(1.0), np.float32(2.0), np.float32(0.5)
    lambda_float32 = log_alpha - half * np.log(one - np.exp(two * log_alpha))
    assert float(lambda_float32) == pytest.approx(5.75281, abs=1e-5)
    assert float(schedule.lambda_(1e-4)) == pytest.approx(5.75151, abs=1e-5)
    t_end = float(schedule.inverse_lambda(np.float64(lambda_float32)))

    times = _queried_times(schedule, steps=20, order=3, t_end=t_end)
    np.testing.assert_array_equal(_round_significant(times[:16]), PUBLISHED_LINEAR_TIMES[:16])
    np.testing.assert_allclose(times[16:], PUBLISHED_LINEAR_TIMES[16:], rtol=2.5e-3, atol=0)
