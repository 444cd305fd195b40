"""Split eta estimation into shards whose partial sums merge into the single-process table.

``accumulate_row_sums`` evaluates the samples [start, stop) of every row as one stream in row
order, cut into batches of ``batch_size`` evaluations. This module cuts that stream into
contiguous ranges of whole batches, one per shard, and converts each range back into per-row
sample ranges. A shard's call then forms exactly the batches of the single-process call, so
every network evaluation gets the same input, in a batch of the same composition, as in one
process. The float64 sums are added batch by batch in the same order too, so a row that lies
within one shard gets bit-identical sums (adding the other shards' zeros changes nothing).

Shard boundaries are moved, by at most ``BOUNDARY_SLACK`` of a shard's length, to a batch
boundary where a row starts, so that no row is split whenever such a boundary exists. A row
that is split between two shards gets sums that differ from the single-process ones in float64
rounding only, far below the float32 resolution of the table.

A shard's result is a ``PartialSums``: ``RowSums`` with the run's metadata, saved as ``.npz``
(``save_partial``) and added up by ``merge_partials``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.calibration_tables.estimate import (
    DEFAULT_ESTIMATOR,
    EtaEstimate,
    RowSums,
    accumulate_row_sums,
    estimate_from_row_sums,
    table_coefficients,
    uniform_ranges,
)
from calibexport.errors import CalibexportError

if TYPE_CHECKING:
    import torch

    from calibexport.runtime.schedule import VPSchedule

logger = logging.getLogger(__name__)

#: Value of the ``format`` field of a partial-sum file.
PARTIAL_FORMAT = "calibexport.eta_partial_sums"
PARTIAL_VERSION = 1
#: Largest move of a shard boundary, as a fraction of the batches per shard.
BOUNDARY_SLACK = 0.1
#: RowSums arrays stored in a partial-sum file; the last three only for regression estimators.
SUM_ARRAYS = ("counts", "sums", "squares", "noise_sums", "noise_squares", "cross")
# Metadata entries that every shard of one run must share.
_SHARED_KEYS = ("schedule", "data", "model_weights_sha256", "estimator", "seed", "num_samples",
                "batch_size", "common_noise", "num_rows", "image_shape", "num_shards")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count`` shards; written ``I/N`` with I = index + 1."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and self.count >= 1
                and isinstance(self.index, int) and 0 <= self.index < self.count):
            raise CalibexportError(
                f"invalid shard {self.index + 1}/{self.count}: use I/N with 1 <= I <= N, "
                "for example --shard 1/4."
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse ``I/N`` (1-based, as in ``--shard 2/4``)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if match is None:
            raise CalibexportError(
                f"invalid shard {text!r}: use I/N with 1 <= I <= N, for example --shard 1/4."
            )
        return cls(int(match.group(1)) - 1, int(match.group(2)))

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{self.count}"


@dataclass(frozen=True)
class BatchPlan:
    """The evaluation stream of one ``accumulate_row_sums`` call and its batches.

    ``ranges`` [T, 2] contains each row's evaluation indices [start, stop). The stream lists them
    row after row, and batch b is stream positions [b * batch_size, (b + 1) * batch_size).
    """

    ranges: np.ndarray
    batch_size: int

    @property
    def row_starts(self) -> np.ndarray:
        """Stream position of each row's first evaluation, int64 [T + 1] ending with the total."""
        lengths = self.ranges[:, 1] - self.ranges[:, 0]
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    @property
    def num_batches(self) -> int:
        return math.ceil(int(self.row_starts[-1]) / self.batch_size)

    def shard_bounds(self, count: int) -> list[int]:
        """Return the first batch of each of ``count`` shards, then ``num_batches``."""
        total = self.num_batches
        starts = self.row_starts
        aligned = np.unique(starts[starts % self.batch_size == 0] // self.batch_size)
        slack = max(1, int(BOUNDARY_SLACK * total / count))
        bounds = [0]
        for index in range(1, count):
            ideal = round(index * total / count)
            near = aligned[(aligned >= ideal - slack) & (aligned <= ideal + slack)]
            choice = int(near[np.argmin(np.abs(near - ideal))]) if len(near) else ideal
            bounds.append(min(max(choice, bounds[-1]), total))
        return bounds + [total]

    def shard_ranges(self, shard: Shard) -> tuple[np.ndarray, range]:
        """Return the per-row ranges [T, 2] of ``shard`` and the batches they make up."""
        bounds = self.shard_bounds(shard.count)
        batches = range(bounds[shard.index], bounds[shard.index + 1])
        return self.stream_ranges(batches.start * self.batch_size,
                                  batches.stop * self.batch_size), batches

    def stream_ranges(self, first: int, stop: int) -> np.ndarray:
        """Return per-row ranges [T, 2] of stream positions [first, stop); [0, 0] for no samples."""
        starts = self.row_starts
        low = np.clip(first - starts[:-1], 0, starts[1:] - starts[:-1])
        high = np.clip(stop - starts[:-1], 0, starts[1:] - starts[:-1])
        ranges = np.stack([self.ranges[:, 0] + low, self.ranges[:, 0] + high], axis=1)
        ranges[high <= low] = 0
        return ranges.astype(np.int64)


@dataclass
class PartialSums:
    """A shard's ``RowSums`` with the metadata of its run."""

    sums: RowSums
    metadata: dict[str, Any] = field(default_factory=dict)


def accumulate_shard(
    model: torch.nn.Module,
    data: np.ndarray,
    alpha: np.ndarray,
    sigma: np.ndarray,
    ranges: np.ndarray,
    shard: Shard,
    *,
    estimator: str,
    batch_size: int,
    seed: int,
    common_noise: bool = False,
    progress: bool = False,
) -> tuple[RowSums, range]:
    """Evaluate ``shard``'s part of ``accumulate_row_sums(..., ranges)``; return it and its batches.

    Adding the results of every shard gives the sums of the single call (see the module text).
    """
    plan = BatchPlan(np.asarray(ranges, dtype=np.int64), batch_size)
    shard_ranges, batches = plan.shard_ranges(shard)
    sums = accumulate_row_sums(model, data, alpha, sigma, shard_ranges, estimator=estimator,
                               batch_size=batch_size, seed=seed, common_noise=common_noise,
                               progress=progress)
    return sums, batches


def estimate_partial(
    model: torch.nn.Module,
    schedule: VPSchedule,
    data: np.ndarray,
    *,
    num_samples: int,
    shard: Shard,
    estimator: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    common_noise: bool = False,
    progress: bool = True,
) -> PartialSums:
    """Evaluate ``shard`` of the run ``estimate_eta`` makes with the same arguments.

    The metadata records the shard, its batches and the run settings; ``run_metadata`` adds the
    model and the data.
    """
    from calibexport.calibration_tables.estimate import _check_arguments

    estimator = DEFAULT_ESTIMATOR if estimator is None else estimator
    _check_arguments(data, num_samples, estimator, batch_size)
    alpha, sigma = table_coefficients(schedule)
    ranges = uniform_ranges(len(alpha), num_samples)
    plan = BatchPlan(ranges, batch_size)
    logger.info("Estimating eta shard %s of %d rows x %d samples (estimator %s, seed %d).",
                shard.label, len(alpha), num_samples, estimator, seed)
    start = time.perf_counter()
    sums, batches = accumulate_shard(model, data, alpha, sigma, ranges, shard,
                                     estimator=estimator, batch_size=batch_size, seed=seed,
                                     common_noise=common_noise, progress=progress)
    seconds = time.perf_counter() - start
    evaluations = int(sums.evaluations.sum())
    logger.info("Shard %s evaluated batches %d..%d of %d (%d evaluations in %.1fs, %.1f "
                "evaluations/s).", shard.label, batches.start, batches.stop, plan.num_batches,
                evaluations, seconds, evaluations / max(seconds, 1e-9))
    metadata = {
        "shard": shard.index, "num_shards": shard.count, "batches": [batches.start, batches.stop],
        "total_batches": plan.num_batches, "estimator": estimator, "seed": seed,
        "num_samples": num_samples, "batch_size": batch_size, "common_noise": common_noise,
        "num_rows": len(alpha), "image_shape": [int(dim) for dim in data.shape[1:]],
        "schedule": schedule.to_spec(),
    }
    return PartialSums(sums, metadata)


def finalize(partial: PartialSums) -> EtaEstimate:
    """Turn the sums of a whole run into its EtaEstimate, exactly as ``estimate_eta`` does."""
    return estimate_from_row_sums(partial.sums, seed=int(partial.metadata["seed"]),
                                  common_noise=bool(partial.metadata.get("common_noise")))


def shard_file_path(out: str | Path, shard: Shard) -> Path:
    """Return the partial-sum file for ``out``: a ``.npz`` as given, else named after the shard.

    ``dir/eta.npy`` gives ``dir/eta.shard-2-of-4.npz``, and a folder ``dir`` gives the same
    file inside it.
    """
    out = Path(out)
    name = f"shard-{shard.index + 1}-of-{shard.count}.npz"
    if out.suffix == ".npz":
        return out
    if out.suffix == ".npy":
        return out.with_name(f"{out.stem}.{name}")
    return out / f"eta.{name}"


def save_partial(path: str | Path, partial: PartialSums) -> Path:
    """Write ``partial`` as ``.npz``: the RowSums arrays and the metadata as a JSON string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": PARTIAL_FORMAT, "format_version": PARTIAL_VERSION, **partial.metadata}
    arrays = {name: getattr(partial.sums, name) for name in SUM_ARRAYS
              if getattr(partial.sums, name) is not None}
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, metadata=np.array(json.dumps(metadata, allow_nan=False)), **arrays)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("Saved the partial sums of shard %d/%d to %s.", partial.metadata["shard"] + 1,
                partial.metadata["num_shards"], path)
    return path


def load_partial(path: str | Path) -> PartialSums:
    """Read a partial-sum file written by ``save_partial``; raise naming the file if invalid."""
    import zipfile

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise CalibexportError(
            f"cannot read partial sums {path}: {error}; run its shard again."
        ) from error
    missing = {"counts", "sums", "squares", "metadata"} - set(arrays)
    if missing:
        raise CalibexportError(
            f"{path} is not a partial-sum file: the arrays {sorted(missing)} are missing."
        )
    metadata = json.loads(str(arrays.pop("metadata")))
    version = metadata.get("format_version")
    if metadata.get("format") != PARTIAL_FORMAT or version != PARTIAL_VERSION:
        raise CalibexportError(
            f"{path} has format {metadata.get('format')!r} version "
            f"{version!r}; expected {PARTIAL_FORMAT!r} version "
            f"{PARTIAL_VERSION}. Run its shard again with this calibexport."
        )
    sums = RowSums(metadata["estimator"], **{name: arrays.get(name) for name in SUM_ARRAYS})
    return PartialSums(sums, metadata)


def merge_partials(paths: Sequence[str | Path]) -> PartialSums:
    """Read and add the partial sums of every shard of one run; check that they belong together.

    Raises, naming the files, when shards are missing or repeated, when their settings differ,
    or when the merged sums do not give every row ``num_samples`` evaluations.
    """
    if not paths:
        raise CalibexportError("no partial-sum files given; pass every shard's .npz file.")
    partials = [(Path(path), load_partial(path)) for path in paths]
    _check_shards_belong_together(partials)
    order = sorted(partials, key=lambda item: item[1].metadata["shard"])

    # Add in shard order. A row within one shard only has zeros added, which is exact.
    total = order[0][1].sums
    for _, partial in order[1:]:
        total = total + partial.sums
    expected = int(order[0][1].metadata["num_samples"])
    evaluations = total.evaluations
    if not np.all(evaluations == expected):
        row = int(np.argmax(evaluations != expected))
        raise CalibexportError(
            f"the merged shards give row {row} {int(evaluations[row])} evaluations, expected "
            f"{expected}; the files {[str(path) for path, _ in order]} are not one complete run."
        )
    metadata = {key: value for key, value in order[0][1].metadata.items()
                if key not in ("shard", "batches")}
    metadata["merged_from"] = [str(path) for path, _ in order]
    return PartialSums(total, metadata)


def run_metadata(loaded: Any, data_description: dict[str, Any]) -> dict[str, Any]:
    """Return the model and data entries that a partial-sum file records about its run."""
    from calibexport import __version__

    return {"data": dict(data_description), "model_weights_sha256": loaded.weights_sha256,
            "extra": {"model": dict(loaded.source)}, "calibexport_version": __version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _check_shards_belong_together(partials: list[tuple[Path, PartialSums]]) -> None:
    first_path, first = partials[0]
    for path, partial in partials[1:]:
        for key in _SHARED_KEYS:
            if partial.metadata.get(key) != first.metadata.get(key):
                raise CalibexportError(
                    f"{path} and {first_path} come from different runs: {key} is "
                    f"{partial.metadata.get(key)!r} in one and {first.metadata.get(key)!r} in the "
                    "other. Merge only shards of one calibrate command."
                )
    seen: dict[int, Path] = {}
    for path, partial in partials:
        index = partial.metadata["shard"]
        if index in seen:
            raise CalibexportError(
                f"{seen[index]} and {path} are both shard {index + 1}/"
                f"{partial.metadata['num_shards']}; pass each shard once."
            )
        seen[index] = path
    count = first.metadata["num_shards"]
    missing = [f"{index + 1}/{count}" for index in range(count) if index not in seen]
    if missing:
        raise CalibexportError(
            f"shards {', '.join(missing)} are missing from {[str(path) for path, _ in partials]}; "
            "run them with calibrate --shard and pass every file."
        )
