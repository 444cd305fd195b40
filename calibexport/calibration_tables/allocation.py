"""Allocating Monte Carlo samples across the rows of an eta table.

Rows differ a lot in how noisy their terms are (on the digits demo model the control-variate
term has per-pixel variance 0.23 at k = 0 and 0.0006 at k = 999), so the same number of
samples per row wastes most of them. The quantities used here, for row k with per-pixel
standard errors SE_kp and estimate eta_kp over the D pixels p:

* RMS standard error ``se_k = sqrt(mean_p SE_kp^2)``, the root mean square error per pixel
  that the Monte Carlo noise is expected to leave in the row;
* relative standard error ``r_k = ||SE_k|| / ||eta_k|| = se_k / rms_p(eta_kp)``, the expected
  relative L2 error of the row. ||eta_k|| of an estimate exceeds the true norm by a factor
  sqrt(1 + r_k^2) on average, so r_k is slightly low while it is large, and within 0.5% of its
  value once r_k <= 0.1.

A row whose terms have per-pixel variance v_kp reaches RMS standard error s with
n_k = mean_p(v_kp) / s^2 terms, the allocation used by ``allocate_samples``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from calibexport.calibration_tables.estimate import (
    RowSums,
    evaluations_per_term,
    minimum_terms,
    row_moments,
    uniform_ranges,
)
from calibexport.errors import CalibexportError

logger = logging.getLogger(__name__)

#: Evaluations per row at which ``sample_to_target`` stops adding samples when no
#: ``max_samples`` is passed.
DEFAULT_MAX_SAMPLES = 16384
#: A round allocates for a standard error this much below the target, so that the noise in the
#: variance estimates does not leave most rows just above it.
SAFETY = 1.1
#: A row grows at most this many times per round, because its pilot variance may be far off.
MAX_GROWTH = 16
MAX_ROUNDS = 20


def rms_standard_error(standard_error: np.ndarray) -> np.ndarray:
    """Return the RMS over pixels of the per-pixel standard error of each row [T]."""
    rows = np.asarray(standard_error, dtype=np.float64).reshape(len(standard_error), -1)
    return np.sqrt((rows**2).mean(axis=1))


def relative_standard_error(eta: np.ndarray, standard_error: np.ndarray) -> np.ndarray:
    """Return ||SE_k|| / ||eta_k|| for each row [T]: inf where eta_k is 0 and SE_k is not."""
    eta_rows = np.asarray(eta, dtype=np.float64).reshape(len(eta), -1)
    se_norm = rms_standard_error(standard_error)
    eta_norm = np.sqrt((eta_rows**2).mean(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = se_norm / eta_norm
    return np.where(se_norm == 0.0, 0.0, relative)


def allocate_samples(
    term_variance: np.ndarray,
    target_rms_se: float | np.ndarray,
    *,
    estimator: str,
    maximum: int | None = None,
) -> np.ndarray:
    """Return the evaluations per row [T] that bring each row's RMS standard error to the target.

    ``term_variance`` [T] is the mean over pixels of the per-pixel variance of one term of
    ``estimator``, and ``target_rms_se`` a float or one target per row. Row k gets
    n_k = ceil(term_variance_k / target_k^2) terms, at least the estimator's minimum, times the
    evaluations per term (2 for ``antithetic``), capped at ``maximum`` evaluations.
    """
    variance = np.asarray(term_variance, dtype=np.float64)
    target = np.broadcast_to(np.asarray(target_rms_se, dtype=np.float64), variance.shape)
    if np.any(target < 0) or np.any(np.isnan(target)):
        raise CalibexportError(f"target standard errors must be >= 0, got {target.min()!r}.")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(variance > 0, variance / target**2, 0.0)
    per_term = evaluations_per_term(estimator)
    limit = np.inf if maximum is None else maximum // per_term
    terms = np.clip(np.ceil(terms), minimum_terms(estimator), max(limit, minimum_terms(estimator)))
    return terms.astype(np.int64) * per_term


def sample_to_target(
    accumulate: Callable[[np.ndarray], RowSums],
    num_rows: int,
    *,
    estimator: str,
    pilot_samples: int,
    target_se: float,
    max_samples: int | None = None,
) -> RowSums:
    """Sample every row until the largest relative standard error is below ``target_se``.

    ``accumulate(ranges)`` evaluates the samples [start, stop) of each row and returns their
    RowSums. A pilot of ``pilot_samples`` evaluations per row estimates each row's variance
    and eta. Then each round extends every row still at or above the target to the count that
    ``allocate_samples`` gives for a standard error of ``target_se * rms(eta_k) / SAFETY``.
    A row grows at most MAX_GROWTH times per round and never past ``max_samples``
    (``DEFAULT_MAX_SAMPLES`` when None). Rows that reach the cap are reported in a warning.
    """
    maximum = DEFAULT_MAX_SAMPLES if max_samples is None else max_samples
    _check_target(target_se, maximum, pilot_samples, estimator)
    counts = np.full(num_rows, pilot_samples, dtype=np.int64)
    sums = accumulate(uniform_ranges(num_rows, pilot_samples))

    for round_index in range(1, MAX_ROUNDS + 1):
        # Measure the table: the relative standard error of every row.
        moments = row_moments(sums)
        relative = relative_standard_error(moments.mean, moments.standard_error)
        worst = int(np.argmax(relative))
        logger.info(
            "Round %d: %d evaluations; max relative standard error %.3g at row %d (target %g).",
            round_index, int(counts.sum()), float(relative[worst]), worst, target_se,
        )
        if relative[worst] < target_se:
            return sums

        # Extend the rows above the target towards the count that reaches it.
        next_counts = _next_counts(moments.variance, moments.mean, counts, relative, target_se,
                              estimator, maximum)
        if np.all(next_counts <= counts):
            _warn_capped(relative, counts, target_se, maximum)
            return sums
        ranges = np.stack([counts, np.maximum(next_counts, counts)], axis=1)
        sums = sums + accumulate(ranges)
        counts = np.maximum(counts, next_counts)

    relative = relative_standard_error(*_mean_and_error(sums))
    logger.warning(
        "Stopped after %d rounds with max relative standard error %.3g (target %g); raise "
        "--target-se or run again with a larger --num-samples pilot.",
        MAX_ROUNDS, float(relative.max()), target_se,
    )
    return sums


def _next_counts(
    variance: np.ndarray,
    eta: np.ndarray,
    counts: np.ndarray,
    relative: np.ndarray,
    target_se: float,
    estimator: str,
    maximum: int,
) -> np.ndarray:
    """Return the evaluations each row should have after the next round."""
    term_variance = variance.reshape(len(variance), -1).mean(axis=1)
    eta_rms = np.sqrt((eta.reshape(len(eta), -1) ** 2).mean(axis=1))
    target_counts = allocate_samples(term_variance, target_se * eta_rms / SAFETY,
                                     estimator=estimator, maximum=maximum)
    per_term = evaluations_per_term(estimator)
    growth_cap = (counts * MAX_GROWTH) // per_term * per_term
    target_counts = np.minimum(target_counts, growth_cap)
    return np.where(relative >= target_se, target_counts, counts)


def _mean_and_error(sums: RowSums) -> tuple[np.ndarray, np.ndarray]:
    moments = row_moments(sums)
    return moments.mean, moments.standard_error


def _warn_capped(
    relative: np.ndarray, counts: np.ndarray, target_se: float, maximum: int
) -> None:
    above = np.flatnonzero(relative >= target_se)
    worst = int(above[np.argmax(relative[above])])
    logger.warning(
        "%d rows reached %d evaluations with a relative standard error still >= %g (worst: "
        "row %d, %.3g with %d evaluations); raise --max-samples or --target-se.",
        len(above), maximum, target_se, worst, float(relative[worst]), int(counts[worst]),
    )


def _check_target(target_se: float, maximum: int, pilot_samples: int, estimator: str) -> None:
    if not (isinstance(target_se, (int, float)) and np.isfinite(target_se) and target_se > 0):
        raise CalibexportError(
            f"target_se must be a positive number (a relative standard error such as 0.2), "
            f"got {target_se!r}."
        )
    if isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < pilot_samples:
        raise CalibexportError(
            f"max_samples must be an integer >= the pilot num_samples ({pilot_samples}), got "
            f"{maximum!r}."
        )
    if estimator == "antithetic" and maximum % 2:
        raise CalibexportError(
            f"the antithetic estimator evaluates pairs, so max_samples must be even, got "
            f"{maximum}."
        )
