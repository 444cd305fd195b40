"""Tests for eta estimation against the exact noise prediction of Gaussian data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibexport.calibration_tables.estimate import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    estimate_eta,
    row_standard_error_summary,
    table_coefficients,
)
from calibexport.errors import CalibexportError
from calibexport.models import DDPMUNet, UNetConfig
from calibexport.runtime.schedule import DiscreteVPSchedule, LinearVPSchedule
from calibexport.testing.gaussian import GaussianData

torch.set_num_threads(1)

# A short schedule that still reaches alpha_T ~ 0.2, so the last rows are mostly noise.
SCHEDULE = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.3, num_timesteps=20)
GAUSSIAN = GaussianData(mean=np.array([0.2, -0.4]).reshape(2, 1, 1),
                        std=np.array([0.5, 0.8]).reshape(2, 1, 1))
OFFSET = np.array([0.3, -0.2]).reshape(2, 1, 1)


class OffsetGaussianEps(torch.nn.Module):
    """Exact noise prediction for ``GAUSSIAN`` plus a constant per-channel offset."""

    def __init__(self, schedule: DiscreteVPSchedule) -> None:
        super().__init__()
        self.alpha, self.sigma = schedule.alpha_sigma_at_timesteps()
        self.seen_dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.seen_dtypes.add(timestep.dtype)
        rows = timestep.numpy().astype(np.int64)
        alpha = self.alpha[rows].reshape(-1, 1, 1, 1)
        sigma = self.sigma[rows].reshape(-1, 1, 1, 1)
        eps = GAUSSIAN.eps(x.numpy().astype(np.float64), alpha, sigma) + OFFSET
        return torch.from_numpy(eps.astype(np.float32))


class TimestepEcho(torch.nn.Module):
    """Returns the timestep in every pixel, so row k of a naive estimate must be exactly k."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return timestep.view(-1, 1, 1, 1).expand_as(x).clone()


@pytest.fixture(scope="module")
def gaussian_images() -> np.ndarray:
    return GAUSSIAN.sample(np.random.default_rng(1), (2048, 2, 4, 4))


def exact_eta(images: np.ndarray) -> np.ndarray:
    """E[eps] over x0 drawn uniformly from ``images``: only the empirical mean shift remains."""
    alpha, sigma = SCHEDULE.alpha_sigma_at_timesteps()
    alpha = alpha.reshape(-1, 1, 1, 1)
    sigma = sigma.reshape(-1, 1, 1, 1)
    shift = images.astype(np.float64).mean(axis=0) - GAUSSIAN.mean
    return sigma * alpha * shift / GAUSSIAN.marginal_std(alpha, sigma) ** 2 + OFFSET


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_recovers_offset_every_row(gaussian_images: np.ndarray, estimator: str) -> None:
    model = OffsetGaussianEps(SCHEDULE)
    result = estimate_eta(model, SCHEDULE, gaussian_images, num_samples=400,
                          estimator=estimator, progress=False)
    expected = exact_eta(gaussian_images)

    assert result.eta.shape == (20, 2, 4, 4)
    assert result.eta.dtype == np.float32
    assert result.standard_error.dtype == np.float32
    assert result.num_samples == 400
    assert result.estimator == estimator
    assert model.seen_dtypes == {torch.float32}
    # Per row and channel, the mean over 16 independent pixels has SE sqrt(sum SE^2) / 16.
    error = (result.eta - expected).mean(axis=(2, 3))
    channel_se = np.sqrt((result.standard_error.astype(np.float64) ** 2).sum(axis=(2, 3))) / 16
    assert np.all(np.abs(error) <= 4 * channel_se), np.abs(error / channel_se).max()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_standard_error_matches_spread(gaussian_images: np.ndarray, estimator: str) -> None:
    result = estimate_eta(OffsetGaussianEps(SCHEDULE), SCHEDULE, gaussian_images,
                          num_samples=400, estimator=estimator, progress=False)
    z = (result.eta - exact_eta(gaussian_images)) / result.standard_error

    # 640 z-scores: their spread is 1 within a few percent if the SE is right.
    assert 0.85 < z.std() < 1.15
    assert abs(z.mean()) < 0.2


def test_control_variate_lowers_variance(gaussian_images: np.ndarray) -> None:
    model = OffsetGaussianEps(SCHEDULE)
    naive = estimate_eta(model, SCHEDULE, gaussian_images, num_samples=200,
                         estimator="naive", progress=False)
    control = estimate_eta(model, SCHEDULE, gaussian_images, num_samples=200,
                           estimator="control_variate", progress=False)
    ratio = (naive.standard_error / control.standard_error).mean(axis=(1, 2, 3)) ** 2

    assert ratio[-1] > 10.0
    assert np.all(np.diff(ratio) > 0)


def test_mixed_batches_route_rows() -> None:
    images = np.zeros((3, 1, 2, 2), dtype=np.float32)
    result = estimate_eta(TimestepEcho(), SCHEDULE, images, num_samples=10,
                          estimator="naive", batch_size=7, progress=False)
    expected = np.broadcast_to(np.arange(20, dtype=np.float32).reshape(-1, 1, 1, 1), (20, 1, 2, 2))

    np.testing.assert_array_equal(result.eta, expected)
    np.testing.assert_array_equal(result.standard_error, np.zeros((20, 1, 2, 2)))


def test_batch_size_does_not_change_samples(gaussian_images: np.ndarray) -> None:
    model = OffsetGaussianEps(SCHEDULE)
    large = estimate_eta(model, SCHEDULE, gaussian_images, num_samples=70,
                         estimator="control_variate", batch_size=256, progress=False)
    small = estimate_eta(model, SCHEDULE, gaussian_images, num_samples=70,
                         estimator="control_variate", batch_size=9, progress=False)

    np.testing.assert_allclose(small.eta, large.eta, rtol=0, atol=1e-6)
    np.testing.assert_allclose(small.standard_error, large.standard_error, rtol=0, atol=1e-6)


def test_seed_controls_samples(gaussian_images: np.ndarray) -> None:
    model = OffsetGaussianEps(SCHEDULE)
    runs = [
        estimate_eta(model, SCHEDULE, gaussian_images, num_samples=20, estimator="naive",
                     seed=seed, progress=False)
        for seed in (3, 3, 4)
    ]

    np.testing.assert_array_equal(runs[0].eta, runs[1].eta)
    assert runs[0].seed == 3
    assert not np.allclose(runs[0].eta, runs[2].eta)


def test_unet_runs_in_eval_mode() -> None:
    config = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.5)
    torch.manual_seed(0)
    model = DDPMUNet(config).train()
    images = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    first = estimate_eta(model, SCHEDULE, images, num_samples=3, estimator="naive",
                         batch_size=32, progress=False)
    second = estimate_eta(model, SCHEDULE, images, num_samples=3, estimator="naive",
                          batch_size=32, progress=False)

    assert first.eta.shape == (20, 1, 8, 8)
    assert np.all(np.isfinite(first.eta))
    # Dropout 0.5 would make two runs differ unless the model is in eval mode.
    np.testing.assert_allclose(first.eta, second.eta, rtol=0, atol=1e-5)
    assert model.training


def test_default_estimator_is_valid() -> None:
    assert DEFAULT_ESTIMATOR in ESTIMATORS
    images = np.zeros((2, 1, 2, 2), dtype=np.float32)
    result = estimate_eta(TimestepEcho(), SCHEDULE, images, num_samples=2, progress=False)
    assert result.estimator == DEFAULT_ESTIMATOR


def test_linear_schedule_rows() -> None:
    schedule = LinearVPSchedule()
    alpha, sigma = table_coefficients(schedule)

    assert len(alpha) == 1000
    np.testing.assert_allclose(alpha[0], schedule.alpha(np.array(1e-3)))
    np.testing.assert_allclose(alpha[-1], schedule.alpha(np.array(1.0)))
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"estimator": "importance"}, "unknown estimator 'importance'"),
        ({"num_samples": 1}, "num_samples must be an integer >= 2"),
        ({"num_samples": 2.5}, "num_samples must be an integer >= 2"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_rejects_invalid_options(kwargs: dict, message: str) -> None:
    images = np.zeros((2, 1, 2, 2), dtype=np.float32)
    options = {"num_samples": 4, "progress": False, **kwargs}
    with pytest.raises(CalibexportError, match=message):
        estimate_eta(TimestepEcho(), SCHEDULE, images, **options)


def test_rejects_invalid_data() -> None:
    bad_nan = np.zeros((2, 1, 2, 2), dtype=np.float32)
    bad_nan[1, 0, 0, 0] = np.nan
    with pytest.raises(CalibexportError, match="data must be a non-empty array"):
        estimate_eta(TimestepEcho(), SCHEDULE, np.zeros((2, 2, 2)), num_samples=2)
    with pytest.raises(CalibexportError, match="data must be a non-empty array"):
        estimate_eta(TimestepEcho(), SCHEDULE, np.zeros((0, 1, 2, 2)), num_samples=2)
    with pytest.raises(CalibexportError, match="data contains NaN"):
        estimate_eta(TimestepEcho(), SCHEDULE, bad_nan, num_samples=2)


def test_rejects_wrong_output_shape() -> None:
    class TwoChannels(torch.nn.Module):
        def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], dim=1)

    images = np.zeros((2, 1, 2, 2), dtype=np.float32)
    with pytest.raises(CalibexportError, match=r"returned shape \[.*, 2, 2, 2\]"):
        estimate_eta(TwoChannels(), SCHEDULE, images, num_samples=2, progress=False)


def test_standard_error_summary() -> None:
    standard_error = np.arange(24, dtype=np.float32).reshape(3, 2, 2, 2)
    summary = row_standard_error_summary(standard_error)

    assert summary["row_max"] == [7.0, 15.0, 23.0]
    assert summary["row_mean"] == [3.5, 11.5, 19.5]
    assert summary["max"] == 23.0


def test_progress_and_log_lines(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    images = np.zeros((2, 1, 2, 2), dtype=np.float32)
    with caplog.at_level("INFO", logger="calibexport.calibration_tables.estimate"):
        estimate_eta(TimestepEcho(), SCHEDULE, images, num_samples=3, progress=True)
    captured = capsys.readouterr()

    assert "60/60" in captured.err
    assert captured.out == ""
    assert "20 rows x 3 samples = 60 evaluations" in caplog.text
    assert "evaluations/s" in caplog.text
