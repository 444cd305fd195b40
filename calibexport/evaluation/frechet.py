"""Frechet distance between two sets of feature vectors, each summarised by a Gaussian.

For Gaussians N(m1, C1) and N(m2, C2) the Frechet (2-Wasserstein) distance squared is

    d^2 = ||m1 - m2||^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2})

(Dowson and Landau, 1982). This is the quantity FID reports, computed here on any features. The
trace of the matrix square root is taken from the eigenvalues of the symmetric positive
semi-definite matrix ``C1^{1/2} C2 C1^{1/2}``, so no complex parts or non-symmetric square roots
arise. The estimate from n samples is biased upward by a term that shrinks like 1/n, so only
distances computed from the same number of samples should be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibexport.errors import CalibexportError


@dataclass(frozen=True)
class GaussianStats:
    """Mean [D] and covariance [D, D] (float64) of ``count`` feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Return the mean and the unbiased covariance of features [N, D] (N >= 2), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise CalibexportError(
            f"features must be a 2-D array [N, D] with N >= 2, got shape {list(features.shape)}; "
            "flatten each sample to one row and pass at least two samples."
        )
    if not np.all(np.isfinite(features)):
        rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise CalibexportError(
            f"features contain NaN or Inf in {len(rows)} of {len(features)} rows, first in row "
            f"{int(rows[0])}; the samples that produced them diverged."
        )
    mean = features.mean(axis=0)
    cov = np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])
    return GaussianStats(mean=mean, cov=cov, count=int(features.shape[0]))


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Return the symmetric square root of a symmetric positive semi-definite matrix.

    Eigenvalues below zero, which only rounding can produce for a covariance, are set to zero.
    """
    symmetric = 0.5 * (matrix + matrix.T)
    values, vectors = np.linalg.eigh(symmetric)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(first: GaussianStats, second: GaussianStats) -> float:
    """Return the squared Frechet distance between two Gaussians (the value FID reports)."""
    if first.dim != second.dim:
        raise CalibexportError(
            f"cannot compare features of dimension {first.dim} and {second.dim}; compute both "
            "statistics with the same feature extractor."
        )

    # Covariance term tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)
    root = psd_sqrt(first.cov)
    product = root @ second.cov @ root
    eigenvalues = np.linalg.eigvalsh(0.5 * (product + product.T))
    trace_sqrt = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
    cov_term = float(np.trace(first.cov) + np.trace(second.cov) - 2.0 * trace_sqrt)

    # Rounding can leave a tiny negative value for identical inputs.
    return frechet_mean_term(first, second) + max(cov_term, 0.0)


def frechet_mean_term(first: GaussianStats, second: GaussianStats) -> float:
    """Return the mean part ||m1 - m2||^2 of the Frechet distance."""
    return float(np.sum((first.mean - second.mean) ** 2))
