"""The eta table: reading ``eta.npy`` with its ``eta.json`` sidecar, and interpolating rows.

Row ``k`` of the float32 array ``[T, C, H, W]`` is eta at model input time ``k``. Between rows
the table is read by linear interpolation, and times outside ``[0, T-1]`` are clamped:

    t' = clip(t, 0, T-1);  lo = floor(t');  hi = min(lo + 1, T-1);  w = t' - lo
    eta(t) = eta[lo] + w * (eta[hi] - eta[lo])

``EtaTable.at`` is the numpy reference for this rule. The eta fold in the exported ONNX graph
computes the same thing, so the two must agree. This module imports numpy only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.hashing import sha256_array

logger = logging.getLogger(__name__)

#: Value of the sidecar's ``format`` field.
SIDECAR_FORMAT = "calibexport.eta_table"
#: Sidecar layout version written by this release; the reader accepts this version and older.
FORMAT_VERSION = 1
TABLE_FILENAME = "eta.npy"


def resolve_table_path(path: str | Path) -> Path:
    """Return the ``.npy`` path for ``path``: the file itself, or ``eta.npy`` inside a folder.

    A path without the ``.npy`` suffix is taken as a folder, whether it exists or not.
    """
    path = Path(path)
    if path.suffix == ".npy" and not path.is_dir():
        return path
    return path / TABLE_FILENAME


def sidecar_path_for(table_path: str | Path) -> Path:
    """Return the sidecar path of a table file: the same stem with ``.json``."""
    return Path(table_path).with_suffix(".json")


@dataclass
class EtaTable:
    """Calibration offsets eta for every model input time, with the sidecar metadata."""

    values: np.ndarray
    metadata: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def num_timesteps(self) -> int:
        return int(self.values.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, channels, height, width = self.values.shape
        return int(channels), int(height), int(width)

    @property
    def sha256(self) -> str:
        """Digest of the float32 values (``calibexport.hashing.sha256_array``)."""
        return sha256_array(self.values)

    def at(self, timestep: np.ndarray) -> np.ndarray:
        """Return eta at model input times ``timestep`` [B] as float32 [B, C, H, W].

        Times are clamped to [0, T-1] and interpolated linearly between rows floor(t) and
        floor(t) + 1, so an integer time returns its row exactly. The weight ``w`` is computed
        in float64 and the blend in float32.
        """
        timestep = np.asarray(timestep, dtype=np.float64)
        if timestep.ndim != 1:
            raise CalibexportError(
                f"timestep must be a 1-D array [B], got shape {list(timestep.shape)}; "
                "pass one model input time per sample."
            )
        if not np.all(np.isfinite(timestep)):
            bad = timestep[~np.isfinite(timestep)][:4].tolist()
            raise CalibexportError(f"timestep contains non-finite values {bad}; pass finite times.")

        # Clamp, then pick the two neighbouring rows and the weight of the upper one.
        last = self.num_timesteps - 1
        clamped = np.clip(timestep, 0.0, float(last))
        lower = np.floor(clamped).astype(np.int64)
        upper = np.minimum(lower + 1, last)
        weight = (clamped - lower).astype(np.float32)[:, None, None, None]

        low_rows = self.values[lower]
        return low_rows + weight * (self.values[upper] - low_rows)


def check_compatible(
    table: EtaTable, image_shape: tuple[int, int, int], num_timesteps: int
) -> None:
    """Raise CalibexportError naming every dimension where the table and the model differ."""
    expected = {"T": num_timesteps, "C": image_shape[0], "H": image_shape[1], "W": image_shape[2]}
    seen = {"T": table.num_timesteps}
    seen.update(zip(("C", "H", "W"), table.image_shape))
    mismatches = [
        f"{name}: table has {seen[name]}, model needs {expected[name]}"
        for name in ("T", "C", "H", "W")
        if seen[name] != expected[name]
    ]
    if mismatches:
        where = f" {table.path}" if table.path is not None else ""
        raise CalibexportError(
            f"eta table{where} does not fit the model ({'; '.join(mismatches)}); "
            "estimate a new table for this model and schedule."
        )


def load_eta_table(path: str | Path) -> EtaTable:
    """Read an eta table (``eta.npy`` or a folder that contains it) and its sidecar, if present.

    Checks that the array is 4-D, float32 or float64 (cast to float32) and finite, and that the
    sidecar's ``eta_sha256`` matches the values. A bare ``.npy`` without a sidecar is accepted.
    """
    table_path = resolve_table_path(path)
    if not table_path.is_file():
        raise CalibexportError(
            f"eta table {table_path} not found; pass an eta.npy file or the folder that "
            "contains it."
        )
    values = _read_values(table_path)

    sidecar_path = sidecar_path_for(table_path)
    metadata = None
    if sidecar_path.is_file():
        metadata = _read_sidecar(sidecar_path)
        _check_sidecar(metadata, values, table_path, sidecar_path)
    else:
        logger.info(
            "eta table %s has no sidecar %s; schedule and model details will come from the model.",
            table_path,
            sidecar_path.name,
        )
    return EtaTable(values=values, metadata=metadata, path=table_path)


def _read_values(table_path: Path) -> np.ndarray:
    try:
        values = np.load(table_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CalibexportError(
            f"cannot read eta table {table_path}: the file is truncated or not a .npy array "
            f"({error}); estimate the table again."
        ) from error
    if not isinstance(values, np.ndarray):
        raise CalibexportError(f"eta table {table_path} is not a single .npy array.")
    if values.ndim != 4:
        raise CalibexportError(
            f"eta table {table_path} must be 4-D [T, C, H, W], got shape {list(values.shape)}."
        )
    if values.dtype == np.float64:
        values = values.astype(np.float32)
    elif values.dtype != np.float32:
        raise CalibexportError(
            f"eta table {table_path} has dtype {values.dtype}; it must be float32 or float64."
        )
    finite_rows = np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
    if not finite_rows.all():
        first = int(np.argmin(finite_rows))
        raise CalibexportError(
            f"eta table {table_path} contains NaN or Inf, first in row {first} "
            f"({int((~finite_rows).sum())} of {len(finite_rows)} rows affected); "
            "estimate the table again."
        )
    return np.ascontiguousarray(values)


def _read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(sidecar_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CalibexportError(
            f"cannot read eta sidecar {sidecar_path}: {error}; "
            "write it again or delete it to use the table without metadata."
        ) from error
    if not isinstance(metadata, dict):
        raise CalibexportError(
            f"eta sidecar {sidecar_path} must contain a JSON object, got {type(metadata).__name__}."
        )
    return metadata


def _check_sidecar(
    metadata: dict[str, Any], values: np.ndarray, table_path: Path, sidecar_path: Path
) -> None:
    version = metadata.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CalibexportError(
            f"eta sidecar {sidecar_path} has format_version {version!r}, but this calibexport "
            f"reads versions up to {FORMAT_VERSION}; upgrade calibexport."
        )
    expected_shape = [metadata.get(key) for key in ("num_timesteps", "channels", "height", "width")]
    if all(dim is not None for dim in expected_shape) and expected_shape != list(values.shape):
        raise CalibexportError(
            f"eta table {table_path} has shape {list(values.shape)} but its sidecar records "
            f"{expected_shape}; the two files belong to different tables."
        )
    recorded = metadata.get("eta_sha256")
    if recorded is not None:
        actual = sha256_array(values)
        if recorded != actual:
            raise CalibexportError(
                f"eta table {table_path} does not match its sidecar: sha256 {actual[:16]}... "
                f"but the sidecar records {str(recorded)[:16]}...; the table was changed or "
                "only partly written, so estimate it again."
            )
