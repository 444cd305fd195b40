"""Frechet distance against closed forms for Gaussians and an independent scipy computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from calibexport.errors import CalibexportError
from calibexport.evaluation.frechet import (
    GaussianStats,
    frechet_distance,
    frechet_mean_term,
    gaussian_stats,
    psd_sqrt,
)


def _stats(mean, cov) -> GaussianStats:
    return GaussianStats(mean=np.asarray(mean, float), cov=np.asarray(cov, float), count=100)


def _random_cov(rng, dim, rank=None):
    factor = rng.standard_normal((dim, rank or dim))
    return factor @ factor.T / dim


def test_identical_gaussians_have_zero_distance():
    rng = np.random.default_rng(0)
    stats = _stats(rng.standard_normal(6), _random_cov(rng, 6))
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-10)


def test_mean_shift_only():
    rng = np.random.default_rng(1)
    cov = _random_cov(rng, 5)
    shift = rng.standard_normal(5)
    distance = frechet_distance(_stats(np.zeros(5), cov), _stats(shift, cov))
    assert distance == pytest.approx(float(shift @ shift), rel=1e-9)


def test_diagonal_closed_form():
    # Commuting (diagonal) covariances: d^2 = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(_stats(m1, np.diag(a)), _stats(m2, np.diag(b))) == pytest.approx(
        expected, rel=1e-12
    )


def test_scaled_covariance_closed_form():
    # C2 = c^2 C1 gives tr(C1) (1 - c)^2 for any C1.
    rng = np.random.default_rng(2)
    cov = _random_cov(rng, 8)
    distance = frechet_distance(_stats(np.zeros(8), cov), _stats(np.zeros(8), 0.49 * cov))
    assert distance == pytest.approx(np.trace(cov) * 0.3**2, rel=1e-9)


def test_matches_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(3)
    first = _stats(rng.standard_normal(10), _random_cov(rng, 10))
    second = _stats(rng.standard_normal(10), _random_cov(rng, 10))
    covmean = scipy.linalg.sqrtm(first.cov @ second.cov).real
    expected = (np.sum((first.mean - second.mean) ** 2) + np.trace(first.cov)
                + np.trace(second.cov) - 2 * np.trace(covmean))
    assert frechet_distance(first, second) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(second, first) == pytest.approx(expected, rel=1e-8)


def test_singular_covariances():
    # Rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative.
    rng = np.random.default_rng(4)
    first = _stats(np.zeros(12), _random_cov(rng, 12, rank=3))
    second = _stats(np.zeros(12), _random_cov(rng, 12, rank=5))
    distance = frechet_distance(first, second)
    assert np.isfinite(distance)
    assert distance > 0


def test_sample_estimate_converges_to_closed_form():
    rng = np.random.default_rng(5)
    features_a = rng.standard_normal((20000, 3)) * np.array([1.0, 2.0, 0.5])
    features_b = rng.standard_normal((20000, 3)) * np.array([1.5, 2.0, 0.5]) + np.array([1, 0, 0])
    expected = 1.0 + (1.0 - 1.5) ** 2
    measured = frechet_distance(gaussian_stats(features_a), gaussian_stats(features_b))
    assert measured == pytest.approx(expected, abs=0.05)


def test_psd_sqrt_squares_back():
    rng = np.random.default_rng(6)
    cov = _random_cov(rng, 7)
    root = psd_sqrt(cov)
    np.testing.assert_allclose(root @ root, cov, atol=1e-10)
    np.testing.assert_allclose(root, root.T, atol=1e-12)


def test_mean_term_is_squared_mean_difference():
    first, second = _stats([1.0, 2.0], np.eye(2)), _stats([0.0, 0.0], 2 * np.eye(2))
    assert frechet_mean_term(first, second) == pytest.approx(5.0)


def test_gaussian_stats_values():
    features = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    stats = gaussian_stats(features)
    np.testing.assert_allclose(stats.mean, [2.0, 4.0])
    np.testing.assert_allclose(stats.cov, np.cov(features.T))
    assert stats.count == 3


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (np.zeros((1, 3)), r"N >= 2, got shape \[1, 3\]"),
        (np.zeros(5), r"2-D array \[N, D\]"),
        (np.array([[0.0, 1.0], [np.nan, 1.0], [1.0, 1.0]]), "NaN or Inf in 1 of 3 rows, first"),
    ],
)
def test_gaussian_stats_rejects_bad_features(features, match):
    with pytest.raises(CalibexportError, match=match):
        gaussian_stats(features)


def test_dimension_mismatch_is_rejected():
    with pytest.raises(CalibexportError, match="dimension 2 and 3"):
        frechet_distance(_stats(np.zeros(2), np.eye(2)), _stats(np.zeros(3), np.eye(3)))
