"""Conversions between eps, x0 and v predictions, and the calibration offset in each type."""

from __future__ import annotations

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.runtime.backends.base import EpsBackend
from calibexport.runtime.prediction import (
    alpha_sigma_at_timesteps,
    calibrate_output,
    check_prediction_type,
    from_eps,
    table_log_alpha,
    to_eps,
)
from calibexport.runtime.sampler import make_eps_fn
from calibexport.runtime.schedule import DiscreteVPSchedule, LinearVPSchedule

SHAPE = (3, 2, 4, 4)


def arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, eps, eta = (rng.normal(size=SHAPE) for _ in range(3))
    log_alpha = rng.uniform(-4.0, -0.01, size=(SHAPE[0], 1, 1, 1))
    alpha = np.exp(log_alpha)
    return x, eps, eta, alpha, np.sqrt(1.0 - alpha**2)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_from_eps_inverts_to_eps(prediction_type):
    x, eps, _, alpha, sigma = arrays()
    output = from_eps(prediction_type, eps, x, alpha, sigma)
    np.testing.assert_allclose(to_eps(prediction_type, output, x, alpha, sigma), eps, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_calibrated_output_implies_eps_minus_eta(prediction_type):
    x, eps, eta, alpha, sigma = arrays(1)
    output = from_eps(prediction_type, eps, x, alpha, sigma)
    calibrated = calibrate_output(prediction_type, output, eta, alpha, sigma)
    implied = to_eps(prediction_type, calibrated, x, alpha, sigma)
    np.testing.assert_allclose(implied, eps - eta, atol=1e-10)


def test_x0_and_v_of_the_same_state():
    # x_t = alpha x0 + sigma e: the x0 prediction is x0 and v = alpha e - sigma x0.
    rng = np.random.default_rng(2)
    x0, noise = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    alpha = np.full((SHAPE[0], 1, 1, 1), 0.6)
    sigma = np.full_like(alpha, 0.8)
    x = alpha * x0 + sigma * noise
    np.testing.assert_allclose(from_eps("x0", noise, x, alpha, sigma), x0, atol=1e-12)
    np.testing.assert_allclose(from_eps("v", noise, x, alpha, sigma), alpha * noise - sigma * x0,
                               atol=1e-12)


def test_discrete_integer_timesteps_use_schedule_rows():
    schedule = DiscreteVPSchedule.linear()
    alpha_rows, sigma_rows = schedule.alpha_sigma_at_timesteps()
    alpha, sigma = alpha_sigma_at_timesteps(schedule, np.array([0.0, 500.0, 999.0]))
    assert np.array_equal(alpha, alpha_rows[[0, 500, 999]])
    assert np.array_equal(sigma, sigma_rows[[0, 500, 999]])


def test_discrete_non_integer_timesteps_interpolate_log_alpha():
    schedule = DiscreteVPSchedule.linear()
    alpha, _ = alpha_sigma_at_timesteps(schedule, np.array([10.25]))
    log_rows = schedule.log_alpha_array
    expected = log_rows[10] + 0.25 * (log_rows[11] - log_rows[10])
    assert np.log(alpha[0]) == pytest.approx(expected, abs=1e-12)


def test_continuous_schedule_follows_solver_time():
    schedule = LinearVPSchedule()
    timestep = np.array([0.0, 123.5, 999.0])
    alpha, sigma = alpha_sigma_at_timesteps(schedule, timestep)
    t = schedule.timestep_to_t(timestep)
    np.testing.assert_allclose(alpha, schedule.alpha(t), rtol=1e-14)
    np.testing.assert_allclose(sigma, schedule.sigma(t), rtol=1e-14)


def test_table_log_alpha_rows():
    schedule = DiscreteVPSchedule.linear(num_timesteps=50)
    table = table_log_alpha(schedule, 50)
    assert table.dtype == np.float32
    np.testing.assert_allclose(table, schedule.log_alpha_array, rtol=1e-7)


def test_invalid_prediction_type():
    with pytest.raises(CalibexportError, match="invalid prediction type 'epsilon'; valid types"):
        check_prediction_type("epsilon")


class ReparameterizedBackend(EpsBackend):
    """A numpy network eps = 0.3 x + timestep / 1000 that reports it in ``prediction_type``."""

    name = "numpy"

    def __init__(self, schedule, prediction_type: str) -> None:
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.image_shape = SHAPE[1:]

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        eps = 0.3 * x + timestep.reshape(-1, 1, 1, 1) / 1000.0
        alpha, sigma = alpha_sigma_at_timesteps(self.schedule, timestep)
        shape = (-1, 1, 1, 1)
        output = from_eps(self.prediction_type, eps, x, alpha.reshape(shape), sigma.reshape(shape))
        return output.astype(np.float32)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_make_eps_fn_converts_to_eps(prediction_type):
    schedule = DiscreteVPSchedule.linear()
    backend = ReparameterizedBackend(schedule, prediction_type)
    x = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
    t = np.array([1.0, 0.5, 0.0123])
    eps = make_eps_fn(backend, schedule)(x, t)
    expected = 0.3 * x + schedule.t_to_timestep(t).reshape(-1, 1, 1, 1) / 1000.0
    assert eps.dtype == np.float32
    np.testing.assert_allclose(eps, expected, atol=1e-4)


def test_make_eps_fn_explicit_type_overrides_backend():
    schedule = DiscreteVPSchedule.linear()
    backend = ReparameterizedBackend(schedule, "x0")
    x = np.random.default_rng(4).normal(size=SHAPE).astype(np.float32)
    t = np.array([1.0, 0.5, 0.25])
    raw = make_eps_fn(backend, schedule, "eps")(x, t)
    np.testing.assert_array_equal(raw, backend.eps(x, schedule.t_to_timestep(t)))
