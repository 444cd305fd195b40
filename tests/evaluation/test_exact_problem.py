"""Solvers and calibration on Gaussian data, where eps and the ODE solution are known exactly.

Two problems:

* correlated Gaussian data x0 ~ N(mu, S) in 8 dimensions (a full covariance with eigenvalues
  from about 0.02 to 3): eps*(x_t, t) = sigma_t (alpha_t^2 S + sigma_t^2 I)^{-1} (x_t - alpha_t mu)
  and the probability-flow ODE maps x_s to
  alpha_t mu + M_t^{1/2} M_s^{-1/2} (x_s - alpha_s mu) with M_t = alpha_t^2 S + sigma_t^2 I;
* per-channel Gaussian data and its exact network as a torch module with a constant offset per
  channel, calibrated through the whole pipeline: ``estimate_eta``, an ``EtaTable`` and the
  calibrated backend that ``calibexport evaluate`` samples with.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibexport.calibration_tables.estimate import estimate_eta
from calibexport.evaluation.evaluate import OffsetBackend
from calibexport.runtime.eta_table import EtaTable
from calibexport.runtime.sampler import make_eps_fn
from calibexport.runtime.schedule import DiscreteVPSchedule
from calibexport.runtime.solvers import solve
from calibexport.testing.gaussian import GaussianData
from calibexport.validate.torch_reference import TorchCalibratedBackend

DIM = 8
SHAPE = (2, 2, 2)


class CorrelatedGaussian:
    """Gaussian data with a full covariance; all the marginal covariances share eigenvectors."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        factor = rng.standard_normal((DIM, DIM))
        covariance = factor @ factor.T / DIM + 0.01 * np.eye(DIM)
        self.eigenvalues, self.eigenvectors = np.linalg.eigh(covariance)
        self.mean = 0.5 * rng.standard_normal(DIM)

    def _matrix(self, diagonal: np.ndarray) -> np.ndarray:
        return (self.eigenvectors * diagonal) @ self.eigenvectors.T

    def eps_fn(self, schedule: DiscreteVPSchedule):
        def eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            alpha, sigma = float(schedule.alpha(t[0])), float(schedule.sigma(t[0]))
            inverse = self._matrix(sigma / (alpha**2 * self.eigenvalues + sigma**2))
            flat = x.reshape(len(x), DIM) - alpha * self.mean
            return (flat @ inverse).reshape(x.shape)

        return eps

    def flow(self, schedule: DiscreteVPSchedule, x: np.ndarray, t_from: float, t_to: float):
        a0, s0 = float(schedule.alpha(t_from)), float(schedule.sigma(t_from))
        a1, s1 = float(schedule.alpha(t_to)), float(schedule.sigma(t_to))
        scale = self._matrix(np.sqrt((a1**2 * self.eigenvalues + s1**2)
                                     / (a0**2 * self.eigenvalues + s0**2)))
        flat = x.reshape(len(x), DIM) - a0 * self.mean
        return (a1 * self.mean + flat @ scale).reshape(x.shape)


@pytest.fixture(scope="module")
def schedule() -> DiscreteVPSchedule:
    return DiscreteVPSchedule.linear()


@pytest.fixture(scope="module")
def problem() -> CorrelatedGaussian:
    return CorrelatedGaussian()


@pytest.fixture(scope="module")
def x_T() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((4, *SHAPE))


def _observed_order(problem, schedule, x_T, method, order, spacing, nfes):
    eps = problem.eps_fn(schedule)
    exact = problem.flow(schedule, x_T, 1.0, schedule.default_t_end)
    errors = [
        float(np.max(np.abs(
            solve(eps, x_T, schedule, steps=int(n), order=order, method=method, spacing=spacing)
            - exact
        )))
        for n in nfes
    ]
    slope = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    return slope, errors


@pytest.mark.parametrize(
    ("method", "order"),
    [
        ("singlestep_fixed", 1), ("singlestep_fixed", 2), ("singlestep_fixed", 3),
        ("singlestep", 2), ("singlestep", 3),
        ("multistep", 1), ("multistep", 2), ("multistep", 3),
        ("ddim", 1),
    ],
)
def test_convergence_order_correlated_data(problem, schedule, x_T, method, order):
    # time_quadratic spacing keeps every method in its asymptotic range over NFE 24..192.
    nfes = np.array([24, 48, 96, 192])
    slope, errors = _observed_order(problem, schedule, x_T, method, order, "time_quadratic", nfes)
    assert abs(slope - order) < 0.35, (slope, errors)
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_convergence_order_logsnr_fixed(problem, schedule, x_T, order):
    # logSNR spacing with one order throughout is the setting of the evaluation table.
    nfes = np.array([48, 96, 192, 384])
    slope, errors = _observed_order(
        problem, schedule, x_T, "singlestep_fixed", order, "logSNR", nfes
    )
    assert abs(slope - order) < 0.35, (slope, errors)


@pytest.mark.parametrize("spacing", ["logSNR", "time_uniform", "time_quadratic"])
def test_ddim_matches_first_order_methods(problem, schedule, x_T, spacing):
    eps = problem.eps_fn(schedule)
    for steps in (5, 10, 20, 40):
        ddim = solve(eps, x_T, schedule, steps=steps, order=1, method="ddim", spacing=spacing)
        for method in ("singlestep", "singlestep_fixed", "multistep"):
            dpm1 = solve(eps, x_T, schedule, steps=steps, order=1, method=method, spacing=spacing)
            np.testing.assert_allclose(ddim, dpm1, rtol=0, atol=1e-10, err_msg=f"{method} {steps}")


# ---------------------------------------------------------------------------------------------
# Calibration of the exact network plus a constant offset, through the evaluation's backend
# ---------------------------------------------------------------------------------------------

GAUSSIAN = GaussianData(mean=np.array([0.4, -0.2]).reshape(2, 1, 1),
                        std=np.array([0.5, 0.8]).reshape(2, 1, 1))
OFFSET = np.array([0.1, -0.15], dtype=np.float32).reshape(2, 1, 1)


class ExactNetwork(torch.nn.Module):
    """The exact eps of ``GAUSSIAN`` at model input time ``timestep``, plus ``offset``."""

    def __init__(self, schedule: DiscreteVPSchedule, offset: np.ndarray) -> None:
        super().__init__()
        self.schedule = schedule
        self.offset = torch.from_numpy(np.asarray(offset, dtype=np.float32))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = self.schedule.timestep_to_t(timestep.double().numpy())
        alpha = self.schedule.alpha(t).reshape(-1, 1, 1, 1)
        sigma = self.schedule.sigma(t).reshape(-1, 1, 1, 1)
        eps = GAUSSIAN.eps(x.double().numpy(), alpha, sigma)
        return torch.from_numpy(eps).float() + self.offset


def _backends(schedule, table):
    biased = ExactNetwork(schedule, OFFSET)
    exact = ExactNetwork(schedule, np.zeros_like(OFFSET))
    return {
        "exact": make_eps_fn(TorchCalibratedBackend(exact, None, SHAPE), schedule),
        "uncalibrated": make_eps_fn(TorchCalibratedBackend(biased, None, SHAPE), schedule),
        "calibrated": make_eps_fn(
            OffsetBackend(TorchCalibratedBackend(biased, None, SHAPE), table), schedule
        ),
    }


def _errors(schedule, eps_fns, method, order, nfe):
    """Return the samples of each variant and their RMS error against the exact ODE solution."""
    x_T = np.random.default_rng(3).standard_normal((64, *SHAPE)).astype(np.float32)
    t_end = schedule.default_t_end
    solution = GAUSSIAN.flow(x_T, float(schedule.alpha(1.0)), float(schedule.sigma(1.0)),
                             float(schedule.alpha(t_end)), float(schedule.sigma(t_end)))
    samples = {
        name: solve(fn, x_T, schedule, steps=nfe, order=order, method=method)
        for name, fn in eps_fns.items()
    }
    errors = {name: float(np.sqrt(np.mean((x - solution) ** 2))) for name, x in samples.items()}
    return samples, errors


METHODS_AND_ORDERS = [
    ("singlestep_fixed", 1), ("singlestep_fixed", 2), ("singlestep_fixed", 3),
    ("singlestep", 2), ("singlestep", 3), ("multistep", 2), ("multistep", 3), ("ddim", 1),
]


@pytest.mark.parametrize(("method", "order"), METHODS_AND_ORDERS)
def test_exact_table_restores_exact_error(schedule, method, order):
    # For Gaussian data E[eps*] = 0 at every t, so eta of the offset network is the offset.
    torch.set_num_threads(1)
    table = EtaTable(values=np.broadcast_to(OFFSET[None], (1000, *SHAPE)).copy())
    eps_fns = _backends(schedule, table)
    for nfe in (10, 20, 40):
        samples, errors = _errors(schedule, eps_fns, method, order, nfe)
        shift = float(np.max(np.abs(samples["uncalibrated"] - samples["exact"])))
        np.testing.assert_allclose(samples["calibrated"], samples["exact"], rtol=0, atol=1e-5)
        assert errors["calibrated"] == pytest.approx(errors["exact"], abs=1e-5)
        assert shift > 0.1, (nfe, shift)
        assert errors["uncalibrated"] > errors["exact"] + 0.2, (nfe, errors)


@pytest.fixture(scope="module")
def estimated_table(schedule):
    torch.set_num_threads(1)
    # Data standardised per channel, so their mean and std are exactly those of GAUSSIAN and
    # the exact network's average over them is zero up to Monte Carlo noise.
    raw = np.random.default_rng(2).standard_normal((2048, *SHAPE))
    raw = (raw - raw.mean(axis=(0, 2, 3), keepdims=True)) / raw.std(axis=(0, 2, 3), keepdims=True)
    data = (GAUSSIAN.mean + GAUSSIAN.std * raw).astype(np.float32)
    return estimate_eta(ExactNetwork(schedule, OFFSET), schedule, data, num_samples=512,
                        batch_size=4096, progress=False)


def test_estimated_eta_recovers_offset(estimated_table):
    residual = np.abs(estimated_table.eta - OFFSET[None])
    assert np.all(residual <= 5 * estimated_table.standard_error + 1e-6)


@pytest.mark.parametrize(("method", "order"), METHODS_AND_ORDERS)
def test_estimated_table_nearly_restores_error(schedule, estimated_table, method, order):
    # With 512 samples per row the table's standard error is up to about 0.05, against an
    # offset of 0.1 to 0.15, so the calibrated error is close to, but not equal to, the exact one.
    eps_fns = _backends(schedule, EtaTable(values=estimated_table.eta))
    for nfe in (10, 20, 40):
        _, errors = _errors(schedule, eps_fns, method, order, nfe)
        uncalibrated_excess = errors["uncalibrated"] - errors["exact"]
        assert uncalibrated_excess > 0.2, (nfe, errors)
        calibrated_excess = abs(errors["calibrated"] - errors["exact"])
        assert calibrated_excess < 0.1 * uncalibrated_excess, (nfe, errors)
