"""Tests for the variance-reduced eta estimators against the exact eps of Gaussian data.

For x0 ~ N(mean, std^2) per channel, eps*(x_t) = (alpha sigma / s^2)(x0 - mean) + (sigma^2 / s^2) e
with s^2 = alpha^2 std^2 + sigma^2, so the optimal regression coefficient b = sigma^2 / s^2 and the
variance left by each estimator are known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibexport.calibration_tables.estimate import (
    RowSums,
    accumulate_row_sums,
    derive_row_sums,
    estimate_eta,
    estimate_from_row_sums,
    row_moments,
    table_coefficients,
    uniform_ranges,
)
from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import DiscreteVPSchedule
from calibexport.testing.gaussian import GaussianData

torch.set_num_threads(1)

SCHEDULE = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.3, num_timesteps=20)
ALPHA, SIGMA = table_coefficients(SCHEDULE)
GAUSSIAN = GaussianData(mean=np.array([0.2, -0.4]).reshape(2, 1, 1),
                        std=np.array([0.5, 0.8]).reshape(2, 1, 1))
OFFSET = np.array([0.3, -0.2]).reshape(2, 1, 1)


class OffsetGaussianEps(torch.nn.Module):
    """Exact noise prediction for ``GAUSSIAN`` plus a constant per-channel offset."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        rows = timestep.numpy().astype(np.int64)
        alpha = ALPHA[rows].reshape(-1, 1, 1, 1)
        sigma = SIGMA[rows].reshape(-1, 1, 1, 1)
        eps = GAUSSIAN.eps(x.numpy().astype(np.float64), alpha, sigma) + OFFSET
        return torch.from_numpy(eps.astype(np.float32))


class Identity(torch.nn.Module):
    """Returns x_t itself: with zero data, eps = sigma_k e, which is odd in e."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return x.clone()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return GAUSSIAN.sample(np.random.default_rng(1), (2048, 2, 4, 4))


def exact_eta(images: np.ndarray) -> np.ndarray:
    """E[eps] over x0 drawn uniformly from ``images``: only the empirical mean shift remains."""
    alpha, sigma = ALPHA.reshape(-1, 1, 1, 1), SIGMA.reshape(-1, 1, 1, 1)
    shift = images.astype(np.float64).mean(axis=0) - GAUSSIAN.mean
    return sigma * alpha * shift / GAUSSIAN.marginal_std(alpha, sigma) ** 2 + OFFSET


def exact_coefficient() -> np.ndarray:
    """b = sigma^2 / s^2 per row and channel, [T, 2, 1, 1]."""
    alpha, sigma = ALPHA.reshape(-1, 1, 1, 1), SIGMA.reshape(-1, 1, 1, 1)
    return sigma**2 / GAUSSIAN.marginal_std(alpha, sigma) ** 2


def data_part_variance(images: np.ndarray) -> np.ndarray:
    """Per-pixel variance of (alpha sigma / s^2)(x0 - mean) over the images, [T, 2, 4, 4]."""
    alpha, sigma = ALPHA.reshape(-1, 1, 1, 1), SIGMA.reshape(-1, 1, 1, 1)
    gain = alpha * sigma / GAUSSIAN.marginal_std(alpha, sigma) ** 2
    return gain**2 * images.astype(np.float64).var(axis=0)


def channel_mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=(2, 3))


@pytest.mark.parametrize("estimator", ["regression", "regression_pixel", "antithetic"])
@pytest.mark.parametrize("common_noise", [False, True])
def test_recovers_exact_eta(images: np.ndarray, estimator: str, common_noise: bool) -> None:
    result = estimate_eta(OffsetGaussianEps(), SCHEDULE, images, num_samples=400,
                          estimator=estimator, common_noise=common_noise, progress=False)
    # Per row and channel, the mean over 16 pixels has SE sqrt(sum SE^2) / 16.
    error = channel_mean(result.eta - exact_eta(images))
    channel_se = np.sqrt((result.standard_error.astype(np.float64) ** 2).sum(axis=(2, 3))) / 16

    assert result.estimator == estimator
    assert result.common_noise is common_noise
    assert np.all(np.abs(error) <= 4 * channel_se), np.abs(error / channel_se).max()


@pytest.mark.parametrize("estimator", ["regression", "regression_pixel", "antithetic"])
def test_standard_error_matches_spread(images: np.ndarray, estimator: str) -> None:
    result = estimate_eta(OffsetGaussianEps(), SCHEDULE, images, num_samples=400,
                          estimator=estimator, seed=5, progress=False)
    z = (result.eta - exact_eta(images)) / result.standard_error

    # 640 z-scores: a spread of 1 within a few percent and no visible bias.
    assert 0.85 < z.std() < 1.15
    assert abs(z.mean()) < 0.2


def test_regression_fits_exact_coefficient(images: np.ndarray) -> None:
    sums = accumulate_row_sums(OffsetGaussianEps(), images, ALPHA, SIGMA,
                               uniform_ranges(20, 2000), estimator="regression_pixel")
    moments = row_moments(sums)
    fitted = channel_mean(moments.coefficient)
    expected = exact_coefficient()[:, :, 0, 0]

    np.testing.assert_allclose(fitted, expected, atol=0.02)
    pooled = row_moments(derive_row_sums(sums, "regression")).coefficient
    assert pooled.shape == (20, 1, 1, 1)
    np.testing.assert_allclose(pooled[:, 0, 0, 0], expected.mean(axis=1), atol=0.02)


def test_variances_match_theory(images: np.ndarray) -> None:
    sums = accumulate_row_sums(OffsetGaussianEps(), images, ALPHA, SIGMA,
                               uniform_ranges(20, 2000), estimator="regression_pixel")
    pairs = accumulate_row_sums(OffsetGaussianEps(), images, ALPHA, SIGMA,
                                uniform_ranges(20, 4000), estimator="antithetic")
    data_part = channel_mean(data_part_variance(images))
    b = exact_coefficient()[:, :, 0, 0]
    expected = {
        "naive": data_part + b**2,
        "control_variate": data_part + (1 - b) ** 2,
        "regression": data_part + (b - b.mean(axis=1, keepdims=True)) ** 2,
        "regression_pixel": data_part,
    }
    for estimator, variance in expected.items():
        measured = channel_mean(row_moments(derive_row_sums(sums, estimator)).variance)
        np.testing.assert_allclose(measured, variance, rtol=0.1, atol=1e-5, err_msg=estimator)
    # One antithetic term (a pair average) keeps only the part even in e: the data part.
    np.testing.assert_allclose(channel_mean(row_moments(pairs).variance), data_part,
                               rtol=0.1, atol=1e-5)


def test_derived_sums_equal_direct_sums(images: np.ndarray) -> None:
    ranges = uniform_ranges(20, 70)
    model = OffsetGaussianEps()
    regression = accumulate_row_sums(model, images, ALPHA, SIGMA, ranges,
                                     estimator="regression", seed=2)
    for estimator in ("naive", "control_variate"):
        direct = accumulate_row_sums(model, images, ALPHA, SIGMA, ranges, estimator=estimator,
                                     seed=2)
        derived = derive_row_sums(regression, estimator)
        np.testing.assert_array_equal(derived.counts, direct.counts)
        np.testing.assert_allclose(derived.sums, direct.sums, rtol=0, atol=1e-9)
        np.testing.assert_allclose(derived.squares, direct.squares, rtol=0, atol=1e-9)


@pytest.mark.parametrize("estimator", ["control_variate", "regression_pixel", "antithetic"])
def test_split_ranges_add_up(images: np.ndarray, estimator: str) -> None:
    model = OffsetGaussianEps()
    whole = accumulate_row_sums(model, images, ALPHA, SIGMA, uniform_ranges(20, 150),
                                estimator=estimator, batch_size=64)
    first = np.stack([np.zeros(20), np.arange(20) * 2 + 60], axis=1).astype(np.int64)
    second = np.stack([first[:, 1], np.full(20, 150)], axis=1)
    parts = [accumulate_row_sums(model, images, ALPHA, SIGMA, ranges, estimator=estimator,
                                 batch_size=38)
             for ranges in (first, second)]
    merged = parts[0] + parts[1]

    np.testing.assert_array_equal(merged.counts, whole.counts)
    for name in ("sums", "squares", "noise_sums", "noise_squares", "cross"):
        mine, theirs = getattr(merged, name), getattr(whole, name)
        if theirs is None:
            assert mine is None
        else:
            np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-9, err_msg=name)


def test_common_noise_shares_draws() -> None:
    zeros = np.zeros((4, 1, 2, 2), dtype=np.float32)
    shared = estimate_eta(Identity(), SCHEDULE, zeros, num_samples=8, estimator="naive",
                          common_noise=True, progress=False)
    independent = estimate_eta(Identity(), SCHEDULE, zeros, num_samples=8, estimator="naive",
                               progress=False)
    # eta_k = sigma_k * mean(e): one mean(e) for every row only when rows share the draws.
    per_sigma = shared.eta.astype(np.float64) / SIGMA.reshape(-1, 1, 1, 1)
    spread = independent.eta.astype(np.float64) / SIGMA.reshape(-1, 1, 1, 1)

    np.testing.assert_allclose(per_sigma, np.broadcast_to(per_sigma[:1], per_sigma.shape),
                               rtol=1e-5, atol=1e-6)
    assert np.ptp(spread, axis=0).max() > 0.1
    np.testing.assert_allclose(shared.eta[0], independent.eta[0], rtol=0, atol=1e-7)


def test_antithetic_pairs_cancel_odd_model() -> None:
    zeros = np.zeros((4, 1, 2, 2), dtype=np.float32)
    result = estimate_eta(Identity(), SCHEDULE, zeros, num_samples=10, estimator="antithetic",
                          batch_size=6, progress=False)

    np.testing.assert_allclose(result.eta, 0.0, atol=1e-6)
    np.testing.assert_allclose(result.standard_error, 0.0, atol=1e-6)
    assert result.num_samples == 10
    assert result.row_samples.tolist() == [10] * 20


def test_estimate_from_merged_sums(images: np.ndarray) -> None:
    model = OffsetGaussianEps()
    direct = estimate_eta(model, SCHEDULE, images, num_samples=40, estimator="regression",
                          seed=4, progress=False)
    halves = [accumulate_row_sums(model, images, ALPHA, SIGMA,
                                  np.tile(bounds, (20, 1)), estimator="regression", seed=4)
              for bounds in ([0, 25], [25, 40])]
    merged = estimate_from_row_sums(halves[0] + halves[1], seed=4)

    np.testing.assert_allclose(merged.eta, direct.eta, rtol=0, atol=1e-6)
    np.testing.assert_allclose(merged.standard_error, direct.standard_error, rtol=0, atol=1e-6)
    assert merged.num_samples == 40
    assert merged.sampling_summary()["total_evaluations"] == 800


def test_row_sums_reject_other_estimator() -> None:
    first = RowSums.zeros("naive", 3, (1, 2, 2))
    second = RowSums.zeros("regression", 3, (1, 2, 2))
    with pytest.raises(CalibexportError, match="cannot add row sums of estimator 'regression'"):
        first + second


def test_row_moments_reject_sparse_rows() -> None:
    sums = RowSums.zeros("regression_pixel", 3, (1, 2, 2))
    sums.counts[:] = [5, 2, 5]
    with pytest.raises(CalibexportError, match="row 1 has 2 terms, fewer than the 3"):
        row_moments(sums)


def test_derive_rejects_non_regression_sums() -> None:
    sums = RowSums.zeros("naive", 3, (1, 2, 2))
    with pytest.raises(CalibexportError, match="cannot derive 'control_variate' sums"):
        derive_row_sums(sums, "control_variate")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"estimator": "antithetic", "num_samples": 5}, "must be even"),
        ({"estimator": "antithetic", "batch_size": 7}, "must be even"),
        ({"estimator": "regression_pixel", "num_samples": 2}, "integer >= 3"),
        ({"estimator": "antithetic", "num_samples": 2}, "integer >= 4"),
    ],
)
def test_rejects_invalid_options(kwargs: dict, message: str) -> None:
    options = {"num_samples": 4, "progress": False, **kwargs}
    with pytest.raises(CalibexportError, match=message):
        estimate_eta(Identity(), SCHEDULE, np.zeros((2, 1, 2, 2), dtype=np.float32), **options)


@pytest.mark.parametrize(
    ("ranges", "estimator", "message"),
    [
        (np.zeros((19, 2), dtype=np.int64), "naive", r"integer array \[20, 2\]"),
        (np.full((20, 2), [5, 3]), "naive", "0 <= start <= stop"),
        (np.full((20, 2), [0, 3]), "antithetic", "even sample range bounds"),
    ],
)
def test_rejects_invalid_ranges(ranges: np.ndarray, estimator: str, message: str) -> None:
    zeros = np.zeros((2, 1, 2, 2), dtype=np.float32)
    with pytest.raises(CalibexportError, match=message):
        accumulate_row_sums(Identity(), zeros, ALPHA, SIGMA, ranges, estimator=estimator)


def test_summary_of_zero_eta_row() -> None:
    # Row 0 has eta = 0 with a non-zero standard error, an infinite relative standard error.
    estimate = estimate_from_row_sums(accumulate_row_sums(
        Identity(), np.zeros((2, 1, 2, 2), dtype=np.float32), ALPHA, SIGMA,
        uniform_ranges(20, 4), estimator="naive"))
    estimate.eta[0] = 0.0
    summary = estimate.sampling_summary()

    assert summary["max_relative_se"] is None
    assert summary["total_evaluations"] == 80
    assert summary["row_samples"] == [4] * 20
