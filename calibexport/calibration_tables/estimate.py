"""Monte Carlo estimation of the calibration offset eta for every model input time.

For a noise-prediction network eps_theta and data x0, calibration (Pang et al., "On Calibrating
Diffusion Probabilistic Models", NeurIPS 2023) subtracts

    eta[k] = E_{x0 ~ data, e ~ N(0, I)} [ eps_theta(alpha_k x0 + sigma_k e, k) ]

at each model input time k. Every estimator below has this expectation:

* ``naive`` averages eps_theta(x_t, k).
* ``control_variate`` averages eps_theta(x_t, k) - e. Because E[e] = 0 the expectation is the
  same, but at large k, where eps_theta(x_t, k) is close to e, the difference has a much lower
  variance than eps_theta alone.
* ``regression`` averages eps_theta(x_t, k) - b e with one coefficient b per row, and
  ``regression_pixel`` with one b per pixel. b = Cov(eps_theta, e) / Var(e) minimises the
  variance and is estimated from the same samples, which biases the mean by O(1/n).
* ``antithetic`` evaluates each draw (x0, e) also at (x0, -e) and averages the pair, which
  cancels every part of eps_theta that is odd in e. A pair costs two evaluations.

Sample ``i`` of row ``k`` is fixed by (seed, k, i). Randomness is drawn per chunk of
``CHUNK_SIZE`` samples from a generator seeded by (seed, row, chunk), so the samples depend
neither on ``batch_size`` nor on ``num_samples``, nor on how the sample range of a row is split.
With ``common_noise`` every row reuses the draws of row 0 (common random numbers), which
correlates the errors of neighbouring rows but leaves the standard error of each row unchanged.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import DiscreteVPSchedule, LinearVPSchedule, VPSchedule

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ESTIMATORS = ("naive", "control_variate", "regression", "regression_pixel", "antithetic")
#: Its variance on the digits demo model is 2.6 (k = 0) to 1655 (k = 999) times lower than
#: the naive estimator's. ``antithetic`` needs 1.4x fewer evaluations there but only takes even
#: counts, so it is an option rather than the default (docs/calibration.md).
DEFAULT_ESTIMATOR = "control_variate"
#: Estimators that also accumulate the noise moments needed to fit the coefficient b.
REGRESSION_ESTIMATORS = ("regression", "regression_pixel")
#: Samples of one row drawn from one generator.
CHUNK_SIZE = 64


def evaluations_per_term(estimator: str) -> int:
    """Return how many network evaluations one averaged term of ``estimator`` costs."""
    return 2 if estimator == "antithetic" else 1


def minimum_terms(estimator: str) -> int:
    """Return the fewest terms per row for which the estimator's standard error is defined."""
    return 3 if estimator == "regression_pixel" else 2


@dataclass
class EtaEstimate:
    """An estimated eta table with the per-pixel standard error of each mean.

    ``num_samples`` is the number of network evaluations of the row with the fewest, and
    ``row_samples`` contains the count of every row (rows differ when ``target_se`` allocated
    them). ``target_se`` is the requested largest relative standard error, if any.
    """

    eta: np.ndarray
    standard_error: np.ndarray
    num_samples: int
    estimator: str
    seed: int = 0
    row_samples: np.ndarray | None = None
    common_noise: bool = False
    target_se: float | None = None

    def sampling_summary(self) -> dict[str, Any]:
        """Describe how the table was sampled, for the sidecar's ``sampling`` field."""
        from calibexport.calibration_tables.allocation import relative_standard_error

        if self.row_samples is None:
            row_samples = np.full(len(self.eta), self.num_samples, dtype=np.int64)
        else:
            row_samples = np.asarray(self.row_samples, dtype=np.int64)
        # A row with eta = 0 and a non-zero SE has an infinite ratio, which JSON cannot hold.
        largest = float(relative_standard_error(self.eta, self.standard_error).max())
        return {
            "row_samples": [int(count) for count in row_samples],
            "total_evaluations": int(row_samples.sum()),
            "common_noise": bool(self.common_noise),
            "target_relative_se": self.target_se,
            "max_relative_se": largest if np.isfinite(largest) else None,
        }


@dataclass
class RowSums:
    """Float64 per-row sums of an estimator's terms, additive across runs and shards.

    ``counts`` [T] is the number of terms accumulated per row (pairs for ``antithetic``).
    ``sums`` and ``squares`` [T, C, H, W] are the sums of the terms and of their squares. The
    regression estimators also keep the sums of e (``noise_sums``), of e^2 (``noise_squares``)
    and of term * e (``cross``). Two RowSums over disjoint samples add up with ``+``.
    """

    estimator: str
    counts: np.ndarray
    sums: np.ndarray
    squares: np.ndarray
    noise_sums: np.ndarray | None = None
    noise_squares: np.ndarray | None = None
    cross: np.ndarray | None = None

    @classmethod
    def zeros(cls, estimator: str, num_rows: int, image_shape: tuple[int, ...]) -> RowSums:
        shape = (num_rows, *image_shape)
        extra = [np.zeros(shape) for _ in range(3)] if estimator in REGRESSION_ESTIMATORS else []
        return cls(estimator, np.zeros(num_rows, dtype=np.int64), np.zeros(shape), np.zeros(shape),
                   *extra)

    @property
    def evaluations(self) -> np.ndarray:
        """Network evaluations per row [T]."""
        return self.counts * evaluations_per_term(self.estimator)

    def __add__(self, other: RowSums) -> RowSums:
        if other.estimator != self.estimator or other.sums.shape != self.sums.shape:
            raise CalibexportError(
                f"cannot add row sums of estimator {other.estimator!r} {list(other.sums.shape)} "
                f"to {self.estimator!r} {list(self.sums.shape)}; merge sums of one estimator "
                "and table shape only."
            )
        arrays = [
            None if mine is None else mine + theirs
            for mine, theirs in zip(self._arrays(), other._arrays())
        ]
        return RowSums(self.estimator, *arrays)

    def _arrays(self) -> list[np.ndarray | None]:
        return [self.counts, self.sums, self.squares, self.noise_sums, self.noise_squares,
                self.cross]


@dataclass
class RowMoments:
    """The estimate from RowSums: eta, the per-term variance and the standard error of eta.

    ``variance`` is the per-pixel variance of one averaged term (the residual variance for the
    regression estimators), so ``standard_error = sqrt(variance / counts)``. ``coefficient`` is
    the fitted b ([T, 1, 1, 1] or per pixel) for the regression estimators, else None.
    """

    mean: np.ndarray
    variance: np.ndarray
    standard_error: np.ndarray
    counts: np.ndarray
    coefficient: np.ndarray | None = field(default=None)


def table_coefficients(schedule: VPSchedule) -> tuple[np.ndarray, np.ndarray]:
    """Return (alpha, sigma) in float64 at the model input times 0..T-1 of the table rows.

    A discrete schedule has T = num_timesteps. A continuous ``linear`` schedule has one row per
    integer model input time from 0 to ``timestep_scale * (1 - t_shift)``.
    """
    if isinstance(schedule, DiscreteVPSchedule):
        return schedule.alpha_sigma_at_timesteps()
    if isinstance(schedule, LinearVPSchedule):
        last = int(np.floor(schedule.t_to_timestep(np.array(schedule.t_max)) + 1e-9))
        t = schedule.timestep_to_t(np.arange(last + 1, dtype=np.float64))
        return schedule.alpha(t), schedule.sigma(t)
    raise CalibexportError(
        f"cannot estimate eta for schedule kind {getattr(schedule, 'kind', type(schedule))!r}; "
        "valid kinds: discrete, linear."
    )


def estimate_eta(
    model: torch.nn.Module,
    schedule: VPSchedule,
    data: np.ndarray,
    *,
    num_samples: int,
    estimator: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    common_noise: bool = False,
    target_se: float | None = None,
    max_samples: int | None = None,
) -> EtaEstimate:
    """Estimate eta[k] for every table row k by Monte Carlo.

    Each sample draws x0 uniformly from ``data`` (float32 [N, C, H, W] in [-1, 1], with
    replacement) and e ~ N(0, I). ``num_samples`` counts network evaluations per row. Batches
    of ``batch_size`` evaluations may mix rows. ``estimator=None`` uses ``DEFAULT_ESTIMATOR``.

    With ``target_se``, ``num_samples`` is the pilot count of every row, and sampling goes on
    row by row until the largest relative standard error ||SE_k|| / ||eta_k|| of the table is
    below ``target_se`` or the row has ``max_samples`` evaluations (see
    ``calibexport.calibration_tables.allocation``).
    """
    from calibexport.calibration_tables.allocation import (
        relative_standard_error,
        sample_to_target,
    )

    estimator = DEFAULT_ESTIMATOR if estimator is None else estimator
    _check_arguments(data, num_samples, estimator, batch_size)
    alpha, sigma = table_coefficients(schedule)
    num_rows = len(alpha)
    options = {"estimator": estimator, "batch_size": batch_size, "seed": seed,
               "common_noise": common_noise, "progress": progress}
    plan = f"{num_rows} rows x {num_samples} samples = {num_rows * num_samples} evaluations"
    if target_se is not None:
        plan = (f"{num_rows} rows x {num_samples} pilot samples, then more until the max "
                f"relative standard error is below {target_se}")
    logger.info(
        "Estimating eta: %s (estimator %s, batch %d, %d data images, seed %d%s).",
        plan, estimator, batch_size, len(data), seed, ", common noise" if common_noise else "",
    )

    start = time.perf_counter()
    if target_se is None:
        sums = accumulate_row_sums(model, data, alpha, sigma,
                                   uniform_ranges(num_rows, num_samples), **options)
    else:
        def accumulate(ranges: np.ndarray) -> RowSums:
            return accumulate_row_sums(model, data, alpha, sigma, ranges, **options)

        sums = sample_to_target(accumulate, num_rows, estimator=estimator,
                                pilot_samples=num_samples, target_se=target_se,
                                max_samples=max_samples)
    seconds = time.perf_counter() - start
    result = estimate_from_row_sums(sums, seed=seed, common_noise=common_noise,
                                    target_se=target_se)
    total = int(sums.evaluations.sum())
    logger.info(
        "Estimated eta in %.1fs: %d evaluations (%.0f evaluations/s); max per-pixel standard "
        "error %.3g, max relative standard error %.3g.",
        seconds, total, total / max(seconds, 1e-9), float(result.standard_error.max()),
        float(relative_standard_error(result.eta, result.standard_error).max()),
    )
    return result


def uniform_ranges(num_rows: int, num_samples: int) -> np.ndarray:
    """Return sample ranges [T, 2] that give every row the samples [0, num_samples)."""
    ranges = np.zeros((num_rows, 2), dtype=np.int64)
    ranges[:, 1] = num_samples
    return ranges


def estimate_from_row_sums(
    sums: RowSums, *, seed: int = 0, common_noise: bool = False, target_se: float | None = None
) -> EtaEstimate:
    """Turn (merged) row sums into an EtaEstimate with float32 eta and standard errors."""
    moments = row_moments(sums)
    row_samples = sums.evaluations
    return EtaEstimate(
        eta=moments.mean.astype(np.float32),
        standard_error=moments.standard_error.astype(np.float32),
        num_samples=int(row_samples.min()),
        estimator=sums.estimator,
        seed=seed,
        row_samples=row_samples,
        common_noise=common_noise,
        target_se=target_se,
    )


def derive_row_sums(sums: RowSums, estimator: str) -> RowSums:
    """Re-express regression row sums as those of ``naive``, ``control_variate`` or a regression.

    Sums of eps, eps^2, e, e^2 and eps e determine the sums of every estimator that evaluates
    each draw once, so one pass over the samples serves them all (``antithetic`` evaluates other
    points and cannot be derived).
    """
    if sums.estimator not in REGRESSION_ESTIMATORS or estimator == "antithetic":
        raise CalibexportError(
            f"cannot derive {estimator!r} sums from {sums.estimator!r} sums; accumulate with a "
            "regression estimator to derive naive, control_variate or regression sums."
        )
    assert sums.noise_sums is not None and sums.noise_squares is not None
    assert sums.cross is not None
    if estimator in REGRESSION_ESTIMATORS:
        return RowSums(estimator, *sums._arrays())
    if estimator == "naive":
        return RowSums(estimator, sums.counts, sums.sums, sums.squares)
    if estimator == "control_variate":
        # Sum of (eps - e) and of (eps - e)^2 = eps^2 - 2 eps e + e^2.
        squares = sums.squares - 2 * sums.cross + sums.noise_squares
        return RowSums(estimator, sums.counts, sums.sums - sums.noise_sums, squares)
    raise CalibexportError(
        f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}."
    )


def row_moments(sums: RowSums) -> RowMoments:
    """Compute eta, the per-term variance and the standard error from float64 row sums.

    Means and unbiased variances come from the sums; the standard error of a mean of n terms
    is sqrt(var / n). For the regression estimators, eta = mean(eps) - b mean(e) with
    b = Cov(eps, e) / Var(e), pooled over the pixels of a row for ``regression``; the variance
    is that of the residual eps - b e, with one degree of freedom less for a per-pixel b.
    """
    least = minimum_terms(sums.estimator)
    if np.any(sums.counts < least):
        row = int(np.argmin(sums.counts))
        raise CalibexportError(
            f"row {row} has {int(sums.counts[row])} terms, fewer than the {least} that the "
            f"{sums.estimator} estimator needs for a standard error; sample every row more."
        )
    n = sums.counts.astype(np.float64).reshape(-1, *([1] * (sums.sums.ndim - 1)))
    mean = sums.sums / n
    variance = np.maximum(_centered(sums.squares, sums.sums, sums.sums, n), 0.0)
    if sums.estimator not in REGRESSION_ESTIMATORS:
        return RowMoments(mean, variance, np.sqrt(variance / n), sums.counts)
    assert sums.noise_sums is not None and sums.noise_squares is not None
    assert sums.cross is not None

    # Fit b = Cov(eps, e) / Var(e), per row (pooled over pixels) or per pixel.
    noise_variance = np.maximum(
        _centered(sums.noise_squares, sums.noise_sums, sums.noise_sums, n), 0.0)
    covariance = _centered(sums.cross, sums.sums, sums.noise_sums, n)
    if sums.estimator == "regression":
        axes = tuple(range(1, sums.sums.ndim))
        coefficient = covariance.sum(axis=axes, keepdims=True) / np.maximum(
            noise_variance.sum(axis=axes, keepdims=True), 1e-300)
        degrees = n - 1
    else:
        coefficient = covariance / np.maximum(noise_variance, 1e-300)
        degrees = n - 2

    # Regression estimate mean(eps) - b mean(e) and the variance of the residual eps - b e.
    estimate = mean - coefficient * sums.noise_sums / n
    residual = variance - 2 * coefficient * covariance + coefficient**2 * noise_variance
    residual = np.maximum(residual, 0.0) * (n - 1) / degrees
    return RowMoments(estimate, residual, np.sqrt(residual / n), sums.counts, coefficient)


def _centered(
    products: np.ndarray, first: np.ndarray, second: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """Unbiased (co)variance from the sum of products and the two sums of n terms."""
    return (products - first * second / n) / (n - 1)


def row_standard_error_summary(standard_error: np.ndarray) -> dict[str, Any]:
    """Summarise the per-pixel standard error: max, mean and RMS of each row, and the max."""
    standard_error = np.asarray(standard_error, dtype=np.float64)
    rows = standard_error.reshape(standard_error.shape[0], -1)
    return {
        "row_max": [float(value) for value in rows.max(axis=1)],
        "row_mean": [float(value) for value in rows.mean(axis=1)],
        "row_rms": [float(value) for value in np.sqrt((rows**2).mean(axis=1))],
        "max": float(rows.max()),
    }


def _check_arguments(data: np.ndarray, num_samples: int, estimator: str, batch_size: int) -> None:
    if estimator not in ESTIMATORS:
        raise CalibexportError(
            f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}."
        )
    least = minimum_terms(estimator) * evaluations_per_term(estimator)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < least:
        raise CalibexportError(
            f"num_samples must be an integer >= {least} so the standard error of the "
            f"{estimator} estimator is defined, got {num_samples!r}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibexportError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if estimator == "antithetic" and (num_samples % 2 or batch_size % 2):
        raise CalibexportError(
            f"the antithetic estimator evaluates pairs (x0, e), (x0, -e), so num_samples and "
            f"batch_size must be even, got num_samples={num_samples}, batch_size={batch_size}."
        )
    if not isinstance(data, np.ndarray) or data.ndim != 4 or len(data) == 0:
        shape = list(np.shape(data))
        raise CalibexportError(
            f"data must be a non-empty array [N, C, H, W], got shape {shape}; "
            "load it with calibexport.calibration_tables.load_data."
        )
    if not np.all(np.isfinite(data)):
        raise CalibexportError("data contains NaN or Inf; clean the data set before estimating.")


def accumulate_row_sums(
    model: torch.nn.Module,
    data: np.ndarray,
    alpha: np.ndarray,
    sigma: np.ndarray,
    sample_ranges: np.ndarray,
    *,
    estimator: str,
    batch_size: int = 256,
    seed: int = 0,
    common_noise: bool = False,
    progress: bool = False,
) -> RowSums:
    """Evaluate the samples [start, stop) of every row and return their float64 row sums.

    ``alpha`` and ``sigma`` [T] come from ``table_coefficients``; ``sample_ranges`` [T, 2]
    contains each row's evaluation indices [start, stop) (start == stop skips the row). Sample i
    of a row is the same in every call, so sums over disjoint ranges (other calls, other
    processes) add up to the sums of one call over their union. For ``antithetic`` the
    bounds must be even: evaluations 2j and 2j + 1 are the pair (x0, e), (x0, -e).
    The model runs in eval mode under ``torch.inference_mode``.
    """
    import torch

    ranges = _checked_ranges(sample_ranges, len(alpha), estimator)
    device = _model_device(model)
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)
    sums = RowSums.zeros(estimator, len(alpha), tuple(images.shape[1:]))
    total = int((ranges[:, 1] - ranges[:, 0]).sum())
    if total == 0:
        return sums

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            _accumulate(model, images, alpha, sigma, ranges, sums, estimator, batch_size, seed,
                        common_noise, progress)
    finally:
        model.train(was_training)
    return sums


def _checked_ranges(sample_ranges: np.ndarray, num_rows: int, estimator: str) -> np.ndarray:
    ranges = np.asarray(sample_ranges)
    if ranges.shape != (num_rows, 2) or not np.issubdtype(ranges.dtype, np.integer):
        raise CalibexportError(
            f"sample_ranges must be an integer array [{num_rows}, 2] of [start, stop) per row, "
            f"got {ranges.dtype} {list(ranges.shape)}."
        )
    ranges = ranges.astype(np.int64)
    if np.any(ranges[:, 0] < 0) or np.any(ranges[:, 1] < ranges[:, 0]):
        raise CalibexportError("sample_ranges needs 0 <= start <= stop in every row.")
    if estimator == "antithetic" and np.any(ranges % 2):
        raise CalibexportError(
            "the antithetic estimator needs even sample range bounds, because evaluations "
            "2j and 2j + 1 form one pair."
        )
    return ranges


def _model_device(model: torch.nn.Module) -> torch.device:
    import torch

    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _accumulate(
    model: torch.nn.Module,
    images: torch.Tensor,
    alpha: np.ndarray,
    sigma: np.ndarray,
    ranges: np.ndarray,
    sums: RowSums,
    estimator: str,
    batch_size: int,
    seed: int,
    common_noise: bool,
    progress: bool,
) -> None:
    """Evaluate every (row, sample) pair in batches and add the terms to ``sums`` in place."""
    import torch
    from tqdm import tqdm

    device = images.device
    alpha_rows = torch.tensor(alpha, dtype=torch.float32, device=device)
    sigma_rows = torch.tensor(sigma, dtype=torch.float32, device=device)
    table = {name: torch.zeros(sums.sums.shape, dtype=torch.float64, device=device)
             for name in ("sums", "squares", "noise_sums", "noise_squares", "cross")}

    total = int((ranges[:, 1] - ranges[:, 0]).sum())
    # Outside a terminal (CI logs, files) update rarely: each update is another line fragment.
    interval = 0.1 if sys.stderr.isatty() else 15.0
    bar = tqdm(total=total, unit="eval", file=sys.stderr, disable=not progress, desc="eta",
               mininterval=interval)
    pieces = _pieces(images, ranges, estimator, seed, common_noise)
    with bar:
        for rows, x0_index, noise in _batches(pieces, batch_size):
            # Forward diffusion x_t = alpha_k x0 + sigma_k e, then one network call per batch.
            scale = alpha_rows[rows].view(-1, 1, 1, 1)
            spread = sigma_rows[rows].view(-1, 1, 1, 1)
            x_t = scale * images[x0_index] + spread * noise
            eps = model(x_t, rows.to(torch.float32))
            if eps.shape != x_t.shape:
                raise CalibexportError(
                    f"the model returned shape {list(eps.shape)} for input {list(x_t.shape)}; "
                    "eta estimation needs a noise prediction of the input's shape."
                )

            # Turn the evaluations into the estimator's terms and add them to their rows.
            rows, terms, noise = _terms(estimator, rows, eps.to(torch.float64),
                                        noise.to(torch.float64))
            table["sums"].index_add_(0, rows, terms)
            table["squares"].index_add_(0, rows, terms * terms)
            if estimator in REGRESSION_ESTIMATORS:
                table["noise_sums"].index_add_(0, rows, noise)
                table["noise_squares"].index_add_(0, rows, noise * noise)
                table["cross"].index_add_(0, rows, terms * noise)
            bar.update(len(x_t))

    sums.counts += (ranges[:, 1] - ranges[:, 0]) // evaluations_per_term(estimator)
    for name, values in table.items():
        if getattr(sums, name) is not None:
            getattr(sums, name)[...] += values.cpu().numpy()


def _terms(
    estimator: str, rows: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (rows, terms, noise) of one batch: the values whose mean estimates eta."""
    if estimator == "control_variate":
        return rows, eps - noise, noise
    if estimator == "antithetic":
        # Evaluations 2j and 2j + 1 are (x0, e) and (x0, -e): average each pair.
        return rows[0::2], 0.5 * (eps[0::2] + eps[1::2]), noise[0::2]
    return rows, eps, noise


def _batches(
    pieces: Iterator[tuple[int, torch.Tensor, torch.Tensor]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Regroup (row, x0 index, noise) pieces into batches of ``batch_size`` evaluations."""
    import torch

    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    pending_count = 0
    for row, x0_index, noise in pieces:
        pending.append((torch.full_like(x0_index, row), x0_index, noise))
        pending_count += len(x0_index)
        while pending_count >= batch_size:
            batch, pending = _split(pending, batch_size)
            pending_count -= batch_size
            yield batch
    if pending_count:
        yield _split(pending, pending_count)[0]


def _pieces(
    images: torch.Tensor, ranges: np.ndarray, estimator: str, seed: int, common_noise: bool
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (row, x0 index, noise) for the samples [start, stop) of each row, chunk by chunk."""
    for row, (start, stop) in enumerate(ranges):
        stream = 0 if common_noise else row
        for chunk in range(start // CHUNK_SIZE, -(-stop // CHUNK_SIZE)):
            first = chunk * CHUNK_SIZE
            low, high = max(start, first) - first, min(stop, first + CHUNK_SIZE) - first
            x0_index, noise = _chunk_draws(images, stream, chunk, seed, estimator)
            yield row, x0_index[low:high], noise[low:high]


def _chunk_draws(
    images: torch.Tensor, stream: int, chunk: int, seed: int, estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the CHUNK_SIZE samples of one chunk from a generator seeded by (seed, stream, chunk).

    A whole chunk is always drawn, so sample i does not depend on where a range ends.
    ``antithetic`` uses the first half of the draws as pairs (x0, e), (x0, -e).
    """
    import torch

    generator = torch.Generator(device="cpu")
    state = np.random.SeedSequence([seed, stream, chunk]).generate_state(1, dtype=np.uint64)
    generator.manual_seed(int(state[0]) >> 1)
    x0_index = torch.randint(0, len(images), (CHUNK_SIZE,), generator=generator)
    noise = torch.randn((CHUNK_SIZE, *images.shape[1:]), generator=generator)
    if estimator == "antithetic":
        half = CHUNK_SIZE // 2
        x0_index = x0_index[:half].repeat_interleave(2)
        noise = torch.stack([noise[:half], -noise[:half]], dim=1).flatten(0, 1)
    return x0_index.to(images.device), noise.to(images.device)


def _split(
    pieces: list[tuple[torch.Tensor, ...]], count: int
) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    """Take the first ``count`` items of the concatenated pieces; return them and the rest."""
    import torch

    selected: list[tuple[torch.Tensor, ...]] = []
    rest: list[tuple[torch.Tensor, ...]] = []
    needed = count
    for piece in pieces:
        size = len(piece[0])
        if needed >= size:
            selected.append(piece)
            needed -= size
        elif needed > 0:
            selected.append(tuple(part[:needed] for part in piece))
            rest.append(tuple(part[needed:] for part in piece))
            needed = 0
        else:
            rest.append(piece)
    batch = tuple(torch.cat(parts) for parts in zip(*selected))
    return batch, rest
