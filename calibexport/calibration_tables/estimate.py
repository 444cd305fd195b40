"""Monte Carlo estimation of the calibration offset eta for every model input time.

For a noise-prediction network eps_theta and data x0, calibration (Pang et al., "On Calibrating
Diffusion Probabilistic Models", NeurIPS 2023) subtracts

    eta[k] = E_{x0 ~ data, e ~ N(0, I)} [ eps_theta(alpha_k x0 + sigma_k e, k) ]

at each model input time k. Two unbiased estimators are offered:

* ``naive`` averages eps_theta(x_t, k).
* ``control_variate`` averages eps_theta(x_t, k) - e. Because E[e] = 0 the expectation is the
  same, but at large k, where eps_theta(x_t, k) is close to e, the difference has a much lower
  variance than eps_theta alone.

Randomness is drawn per chunk of ``CHUNK_SIZE`` samples of one row from a generator seeded by
(seed, row, chunk), so the samples do not depend on ``batch_size``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import DiscreteVPSchedule, LinearVPSchedule, VPSchedule

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ESTIMATORS = ("naive", "control_variate")
#: Its variance on the digits demo model is 2.6 (k = 0) to 1655 (k = 999) times lower than
#: the naive estimator's (docs/calibration.md).
DEFAULT_ESTIMATOR = "control_variate"
#: Samples of one row drawn from one generator.
CHUNK_SIZE = 64


@dataclass
class EtaEstimate:
    """An estimated eta table with the per-pixel standard error of each mean."""

    eta: np.ndarray
    standard_error: np.ndarray
    num_samples: int
    estimator: str
    seed: int = 0


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
) -> EtaEstimate:
    """Estimate eta[k] for every table row k with ``num_samples`` Monte Carlo pairs per row.

    Each pair draws x0 uniformly from ``data`` (float32 [N, C, H, W] in [-1, 1], with
    replacement) and e ~ N(0, I). Batches of ``batch_size`` evaluations may mix rows. Sums and
    sums of squares are accumulated in float64. ``estimator=None`` uses ``DEFAULT_ESTIMATOR``.
    """
    import torch

    estimator = DEFAULT_ESTIMATOR if estimator is None else estimator
    _check_arguments(data, num_samples, estimator, batch_size)
    alpha, sigma = table_coefficients(schedule)
    num_rows = len(alpha)
    device = _model_device(model)
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)
    total = num_rows * num_samples
    logger.info(
        "Estimating eta: %d rows x %d samples = %d evaluations (estimator %s, batch %d, "
        "%d data images, seed %d).",
        num_rows, num_samples, total, estimator, batch_size, len(images), seed,
    )

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sums, squares = _accumulate(
                model, images, alpha, sigma, num_samples, estimator, batch_size, seed, progress
            )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start

    # Mean and unbiased variance from the float64 sums, then the SE of the mean sqrt(var / n).
    mean = sums / num_samples
    variance = np.maximum(squares - num_samples * mean**2, 0.0) / (num_samples - 1)
    standard_error = np.sqrt(variance / num_samples)
    logger.info(
        "Estimated eta in %.1fs (%.0f evaluations/s); max per-pixel standard error %.3g.",
        seconds, total / max(seconds, 1e-9), float(standard_error.max()),
    )
    return EtaEstimate(
        eta=mean.astype(np.float32),
        standard_error=standard_error.astype(np.float32),
        num_samples=num_samples,
        estimator=estimator,
        seed=seed,
    )


def row_standard_error_summary(standard_error: np.ndarray) -> dict[str, Any]:
    """Summarise the per-pixel standard error: max and mean of each row, and the overall max."""
    standard_error = np.asarray(standard_error, dtype=np.float64)
    rows = standard_error.reshape(standard_error.shape[0], -1)
    return {
        "row_max": [float(value) for value in rows.max(axis=1)],
        "row_mean": [float(value) for value in rows.mean(axis=1)],
        "max": float(rows.max()),
    }


def _check_arguments(data: np.ndarray, num_samples: int, estimator: str, batch_size: int) -> None:
    if estimator not in ESTIMATORS:
        raise CalibexportError(
            f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise CalibexportError(
            f"num_samples must be an integer >= 2 so the standard error is defined, "
            f"got {num_samples!r}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibexportError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(data, np.ndarray) or data.ndim != 4 or len(data) == 0:
        shape = list(np.shape(data))
        raise CalibexportError(
            f"data must be a non-empty array [N, C, H, W], got shape {shape}; "
            "load it with calibexport.calibration_tables.load_data."
        )
    if not np.all(np.isfinite(data)):
        raise CalibexportError("data contains NaN or Inf; clean the data set before estimating.")


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
    num_samples: int,
    estimator: str,
    batch_size: int,
    seed: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate every (row, sample) pair in batches and return float64 sums and sums of squares."""
    import torch
    from tqdm import tqdm

    device = images.device
    alpha_rows = torch.tensor(alpha, dtype=torch.float32, device=device)
    sigma_rows = torch.tensor(sigma, dtype=torch.float32, device=device)
    table_shape = (len(alpha), *images.shape[1:])
    sums = torch.zeros(table_shape, dtype=torch.float64, device=device)
    squares = torch.zeros(table_shape, dtype=torch.float64, device=device)

    total = len(alpha) * num_samples
    bar = tqdm(total=total, unit="eval", file=sys.stderr, disable=not progress, desc="eta")
    with bar:
        for rows, x0_index, noise in _batches(images, len(alpha), num_samples, batch_size, seed):
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

            # Accumulate the per-row sums of the chosen estimator's values.
            values = eps.to(torch.float64)
            if estimator == "control_variate":
                values = values - noise.to(torch.float64)
            sums.index_add_(0, rows, values)
            squares.index_add_(0, rows, values * values)
            bar.update(len(rows))
    return sums.cpu().numpy(), squares.cpu().numpy()


def _batches(
    images: torch.Tensor, num_rows: int, num_samples: int, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (row, x0 index, noise) batches covering num_samples pairs for each row."""
    import torch

    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    pending_count = 0
    for row, x0_index, noise in _chunks(images, num_rows, num_samples, seed):
        pending.append((torch.full_like(x0_index, row), x0_index, noise))
        pending_count += len(x0_index)
        while pending_count >= batch_size:
            batch, pending = _split(pending, batch_size)
            pending_count -= batch_size
            yield batch
    if pending_count:
        yield _split(pending, pending_count)[0]


def _chunks(
    images: torch.Tensor, num_rows: int, num_samples: int, seed: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (row, x0 index, noise) chunks, each drawn from its own seeded generator."""
    import torch

    device = images.device
    generator = torch.Generator(device="cpu")
    for row in range(num_rows):
        for chunk, first in enumerate(range(0, num_samples, CHUNK_SIZE)):
            count = min(CHUNK_SIZE, num_samples - first)
            state = np.random.SeedSequence([seed, row, chunk]).generate_state(1, dtype=np.uint64)
            generator.manual_seed(int(state[0]) >> 1)
            x0_index = torch.randint(0, len(images), (count,), generator=generator)
            noise = torch.randn((count, *images.shape[1:]), generator=generator)
            yield row, x0_index.to(device), noise.to(device)


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
