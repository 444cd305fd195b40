"""Compressed eta tables: rows at knot times, or a low-rank factorisation in time.

Both forms are read by ``calibexport.runtime.eta_table`` (``KnotEta``, ``LowRankEta``) and folded
into ONNX graphs by ``calibexport.exporter.fold_compressed``. This module chooses the knots or
the rank for a requested maximum error and writes the ``.npz`` file with its sidecar.

* ``compress_knots`` starts from the knots {0, T-1} and repeatedly adds the row where linear
  interpolation between the current knots is worst, so knots gather where eta changes fastest.
* ``compress_lowrank`` truncates the SVD of the [T, C*H*W] matrix at the smallest rank whose
  reconstruction meets the error bound.

Errors are measured as the maximum absolute difference over all rows and pixels between the
full table and the compressed form evaluated at the integer times, in float32 as it is served.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.calibration_tables.table_io import write_table_files
from calibexport.errors import CalibexportError
from calibexport.runtime.eta_table import (
    KnotEta,
    LowRankEta,
    load_eta_table,
)

if TYPE_CHECKING:
    import torch

    from calibexport.calibration_tables.estimate import EtaEstimate
    from calibexport.runtime.schedule import VPSchedule

logger = logging.getLogger(__name__)

KINDS = ("knots", "lowrank")


def compress_knots(
    eta: np.ndarray, *, max_error: float | None = None, num_knots: int | None = None
) -> KnotEta:
    """Choose knot times for ``eta`` [T, C, H, W] greedily and return the ``KnotEta`` form.

    Knots are added until the maximum absolute interpolation error is at most ``max_error`` or
    there are ``num_knots`` knots, whichever comes first. At least one of the two is required.
    The error is measured in float64 against the float32 knot rows.
    """
    table = _checked_table(eta)
    _check_limits(max_error, num_knots, "num_knots", minimum=2)
    num_rows = len(table)
    if num_rows < 2:
        raise CalibexportError("a table with one row cannot be compressed; use it as it is.")
    limit = num_rows if num_knots is None else min(num_knots, num_rows)
    tolerance = -1.0 if max_error is None else float(max_error)
    flat = table.reshape(num_rows, -1).astype(np.float64)

    # Each segment between neighbouring knots keeps its worst interior row and that row's error.
    knots = [0, num_rows - 1]
    worst = {0: _segment_worst(flat, 0, num_rows - 1)} if num_rows > 2 else {}
    while len(knots) < limit and worst:
        start = max(worst, key=lambda key: worst[key][1])
        row, error = worst[start]
        if error <= tolerance:
            break

        # Split the worst segment at its worst row and re-measure the two halves.
        end = knots[knots.index(start) + 1]
        knots.insert(knots.index(start) + 1, row)
        del worst[start]
        for left, right in ((start, row), (row, end)):
            if right - left > 1:
                worst[left] = _segment_worst(flat, left, right)
    knot_times = np.asarray(knots, dtype=np.int64)
    return KnotEta(knots=knot_times, rows=np.ascontiguousarray(table[knot_times]))


def compress_lowrank(
    eta: np.ndarray, *, max_error: float | None = None, rank: int | None = None
) -> LowRankEta:
    """Return the truncated SVD of ``eta`` [T, C, H, W] as ``LowRankEta``.

    The rank is the smallest whose float32 reconstruction has a maximum absolute error of at
    most ``max_error``, capped at ``rank``. At least one of the two is required.
    """
    table = _checked_table(eta)
    _check_limits(max_error, rank, "rank", minimum=1)
    num_rows = len(table)
    flat = table.reshape(num_rows, -1).astype(np.float64)
    left, singular, right = np.linalg.svd(flat, full_matrices=False)
    limit = len(singular) if rank is None else min(rank, len(singular))
    if max_error is None:
        return _low_rank_form(left, singular, right, limit, table.shape[1:])

    # Find the smallest rank whose float64 residual meets the bound, one term at a time.
    residual = flat.copy()
    candidate = limit
    for index in range(limit):
        residual -= singular[index] * np.outer(left[:, index], right[index])
        if np.abs(residual).max() <= max_error:
            candidate = index + 1
            break

    # The float32 factors add rounding, so raise the rank until the served rows meet the bound.
    form = _low_rank_form(left, singular, right, candidate, table.shape[1:])
    while form.rank < limit and max_abs_error(table, form) > max_error:
        form = _low_rank_form(left, singular, right, form.rank + 1, table.shape[1:])
    return form


def max_abs_error(eta: np.ndarray, form: KnotEta | LowRankEta) -> float:
    """Return the maximum absolute difference between ``eta`` and ``form`` at integer times."""
    return float(np.max(np.abs(form.dense().astype(np.float64) - eta.astype(np.float64))))


def compression_summary(eta: np.ndarray, form: KnotEta | LowRankEta) -> dict[str, Any]:
    """Describe ``form`` against the full table: errors, sizes and the form's parameters."""
    difference = np.abs(form.dense().astype(np.float64) - eta.astype(np.float64))
    full_bytes = int(np.asarray(eta, dtype=np.float32).nbytes)
    summary: dict[str, Any] = {
        "kind": form.kind,
        "max_abs_error": float(difference.max()),
        "mean_abs_error": float(difference.mean()),
        "row_max_abs_error": [float(value) for value in difference.reshape(len(eta), -1).max(1)],
        "full_bytes": full_bytes,
        "compressed_bytes": form.nbytes,
        "bytes_ratio": form.nbytes / full_bytes,
    }
    if isinstance(form, KnotEta):
        summary["num_knots"] = len(form.knots)
        summary["knots"] = [int(knot) for knot in form.knots]
    else:
        summary["rank"] = form.rank
    return summary


def save_compressed_table(
    path: str | Path, form: KnotEta | LowRankEta, metadata: dict[str, Any] | None
) -> Path:
    """Write ``form`` to the ``.npz`` file ``path`` and its sidecar atomically; return the path.

    ``metadata`` (the full table's sidecar with a ``compression`` entry, or None for a bare file)
    gets ``eta_sha256`` set to the digest of the compressed arrays. Both files go to temporary
    names first and are then renamed, so a failed write leaves no partial file behind.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise CalibexportError(
            f"a compressed eta table is a .npz file, got {path}; name the output like eta.npz."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata is not None:
        metadata = {**metadata, "eta_sha256": form.sha256}
    write_table_files(
        path, lambda handle: np.savez(handle, kind=np.array(form.kind), **form.arrays()), metadata
    )
    logger.info("Saved %s eta table %s (%d bytes, sha256 %s).", form.kind, path, form.nbytes,
                form.sha256[:16])
    return path


def compress_table_file(
    source: str | Path,
    out: str | Path,
    *,
    kind: str,
    max_error: float | None = None,
    num_knots: int | None = None,
    rank: int | None = None,
) -> dict[str, Any]:
    """Compress the dense table at ``source`` into ``out`` (.npz); return the new sidecar."""
    if kind not in KINDS:
        raise CalibexportError(
            f"unknown compression kind {kind!r}; valid kinds: {', '.join(KINDS)}."
        )
    table = load_eta_table(source)
    if table.compressed is not None:
        raise CalibexportError(
            f"{table.path} is already a {table.compressed.kind!r} table; compress the dense "
            "eta.npy instead."
        )
    if kind == "knots":
        if rank is not None:
            raise CalibexportError("--rank applies to lowrank compression; use --num-knots.")
        form: KnotEta | LowRankEta = compress_knots(table.values, max_error=max_error,
                                                    num_knots=num_knots)
    else:
        if num_knots is not None:
            raise CalibexportError("--num-knots applies to knots compression; use --rank.")
        form = compress_lowrank(table.values, max_error=max_error, rank=rank)

    summary = compression_summary(table.values, form)
    summary.update(source=str(table.path), source_eta_sha256=table.sha256,
                   requested_max_error=max_error)
    if max_error is not None and summary["max_abs_error"] > max_error:
        logger.warning("The %s form reaches a maximum error of %.3g, above the requested %.3g, "
                       "because its size limit was reached.", kind, summary["max_abs_error"],
                       max_error)
    metadata = dict(table.metadata) if table.metadata is not None else _bare_sidecar(table.values)
    metadata["compression"] = summary
    metadata["eta_sha256"] = form.sha256
    save_compressed_table(out, form, metadata)
    logger.info("Compressed %s: %s, maximum error %.3g, %d of %d bytes (%.1f%%).", table.path,
                _describe(form), summary["max_abs_error"], form.nbytes, summary["full_bytes"],
                100.0 * summary["bytes_ratio"])
    return metadata


def estimate_eta_at(
    model: torch.nn.Module,
    schedule: VPSchedule,
    data: np.ndarray,
    t: np.ndarray,
    *,
    num_samples: int,
    estimator: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    common_noise: bool = True,
    progress: bool = False,
) -> EtaEstimate:
    """Estimate eta directly at solver times ``t`` [S] in (0, 1], including non-integer model times.

    Row s of the result is E[eps_theta(alpha(t_s) x0 + sigma(t_s) e, timestep(t_s))], with the
    model input time ``schedule.t_to_timestep(t_s)`` passed to the network as float32. The
    estimators, sample draws and batching are those of ``estimate_eta``, with one row per
    requested time. With ``common_noise`` (the default) every time uses the same pairs (x0, e),
    so differences between times carry much less Monte Carlo noise than the times themselves.
    """
    from calibexport.calibration_tables.estimate import (
        DEFAULT_ESTIMATOR,
        _check_arguments,
        accumulate_row_sums,
        estimate_from_row_sums,
        uniform_ranges,
    )

    times = np.asarray(t, dtype=np.float64)
    if times.ndim != 1 or len(times) == 0 or not np.all((times > 0) & (times <= schedule.t_max)):
        raise CalibexportError(
            f"t must be a non-empty 1-D array of solver times in (0, {schedule.t_max}], got "
            f"{times.ravel()[:6].tolist()}."
        )
    estimator = DEFAULT_ESTIMATOR if estimator is None else estimator
    _check_arguments(data, num_samples, estimator, batch_size)
    network = _at_timesteps(model, schedule.t_to_timestep(times))
    sums = accumulate_row_sums(network, data, schedule.alpha(times), schedule.sigma(times),
                               uniform_ranges(len(times), num_samples), estimator=estimator,
                               batch_size=batch_size, seed=seed, common_noise=common_noise,
                               progress=progress)
    return estimate_from_row_sums(sums, seed=seed, common_noise=common_noise)


def interpolation_bias(
    model: torch.nn.Module,
    schedule: VPSchedule,
    data: np.ndarray,
    timesteps: np.ndarray,
    *,
    num_samples: int,
    estimator: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[np.ndarray, EtaEstimate]:
    """Measure how far eta at model input times ``timesteps`` [S] is from the table's rule.

    eta is estimated at each time and at its neighbouring rows floor(t) and floor(t) + 1 with
    common random numbers, and the result is eta(t) minus the linear interpolation of the two
    rows, float64 [S, C, H, W]. Because all three estimates use the same samples, most of their
    Monte Carlo noise cancels in this difference. Also returns the direct estimate at the times.
    """
    from calibexport.calibration_tables.estimate import table_coefficients

    timesteps = np.asarray(timesteps, dtype=np.float64)
    last = len(table_coefficients(schedule)[0]) - 1
    lower = np.clip(np.floor(timesteps), 0, last)
    upper = np.minimum(lower + 1, last)
    times = np.concatenate([timesteps, lower, upper])
    estimate = estimate_eta_at(model, schedule, data, schedule.timestep_to_t(times),
                               num_samples=num_samples, estimator=estimator,
                               batch_size=batch_size, seed=seed)
    count = len(timesteps)
    middle, low, high = (estimate.eta[i * count:(i + 1) * count].astype(np.float64)
                         for i in range(3))
    weight = (np.clip(timesteps, 0, last) - lower)[:, None, None, None]
    bias = middle - (low + weight * (high - low))
    direct = estimate
    direct.eta, direct.standard_error = estimate.eta[:count], estimate.standard_error[:count]
    if direct.row_samples is not None:
        direct.row_samples = direct.row_samples[:count]
    return bias, direct


def _at_timesteps(model: torch.nn.Module, timesteps: np.ndarray) -> torch.nn.Module:
    """Wrap ``model`` so that the input time r (a row index) becomes ``timesteps[r]``."""
    import torch

    class AtTimesteps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("timesteps", torch.tensor(timesteps, dtype=torch.float32),
                                 persistent=False)

        def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.model(x, self.timesteps[rows.long()])

    device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    return AtTimesteps().to(device)


def _describe(form: KnotEta | LowRankEta) -> str:
    if isinstance(form, KnotEta):
        return f"{len(form.knots)} knots"
    return f"rank {form.rank}"


def _bare_sidecar(values: np.ndarray) -> dict[str, Any]:
    from calibexport.runtime.eta_table import FORMAT_VERSION, SIDECAR_FORMAT

    num_timesteps, channels, height, width = (int(dim) for dim in values.shape)
    return {"format": SIDECAR_FORMAT, "format_version": FORMAT_VERSION,
            "num_timesteps": num_timesteps, "channels": channels, "height": height, "width": width}


def _low_rank_form(
    left: np.ndarray, singular: np.ndarray, right: np.ndarray, rank: int, image_shape: tuple
) -> LowRankEta:
    time_factors = (left[:, :rank] * singular[:rank]).astype(np.float32)
    pixel_factors = right[:rank].astype(np.float32).reshape(rank, *image_shape)
    return LowRankEta(time_factors=np.ascontiguousarray(time_factors),
                      pixel_factors=np.ascontiguousarray(pixel_factors))


def _segment_worst(flat: np.ndarray, start: int, end: int) -> tuple[int, float]:
    """Return the interior row of [start, end] with the largest interpolation error, and it."""
    rows = np.arange(start + 1, end)
    weight = ((rows - start) / (end - start))[:, None]
    interpolated = flat[start] + weight * (flat[end] - flat[start])
    errors = np.abs(flat[start + 1:end] - interpolated).max(axis=1)
    worst = int(np.argmax(errors))
    return start + 1 + worst, float(errors[worst])


def _checked_table(eta: np.ndarray) -> np.ndarray:
    table = np.asarray(eta)
    if table.ndim != 4 or not np.issubdtype(table.dtype, np.floating):
        raise CalibexportError(
            f"eta must be a 4-D float array [T, C, H, W], got {table.dtype} {list(table.shape)}."
        )
    if not np.all(np.isfinite(table)):
        raise CalibexportError("eta contains NaN or Inf; estimate the table again.")
    return np.ascontiguousarray(table, dtype=np.float32)


def _check_limits(max_error: float | None, size: int | None, size_name: str, minimum: int) -> None:
    if max_error is None and size is None:
        raise CalibexportError(
            f"give a maximum error (max_error), a size ({size_name}) or both to compress a table."
        )
    if max_error is not None and not (np.isfinite(max_error) and max_error >= 0):
        raise CalibexportError(f"max_error must be a finite number >= 0, got {max_error!r}.")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < minimum):
        raise CalibexportError(f"{size_name} must be an integer >= {minimum}, got {size!r}.")

