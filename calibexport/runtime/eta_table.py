"""The eta table: reading ``eta.npy`` with its ``eta.json`` sidecar, and interpolating rows.

Row ``k`` of the float32 array ``[T, C, H, W]`` is eta at model input time ``k``. Between rows
the table is read by linear interpolation, and times outside ``[0, T-1]`` are clamped:

    t' = clip(t, 0, T-1);  lo = floor(t');  hi = min(lo + 1, T-1);  w = t' - lo
    eta(t) = eta[lo] + w * (eta[hi] - eta[lo])

``EtaTable.at`` is the numpy reference for this rule. The eta fold in the exported ONNX graph
computes the same thing, so the two must agree.

Two compressed forms are stored as ``.npz`` files (with the same ``.json`` sidecar rule). Each
defines the rows ``eta[k]`` at the integer times, and non-integer times interpolate between rows
``lo`` and ``hi`` with the rule above, as for a dense table:

* ``KnotEta`` keeps the rows at K integer knot times ``0 = k_0 < ... < k_{K-1} = T-1``. Row k
  interpolates linearly between its neighbouring knots: with ``j`` the last knot index such that
  ``k_j <= k`` (at most K-2) and ``w_k = (k - k_j) / (k_{j+1} - k_j)`` in float32,
  ``eta[k] = v_j + w_k * (v_{j+1} - v_j)``. Because knots are integers, eta(t) is the
  piecewise-linear interpolant through the knots.
* ``LowRankEta`` stores ``eta[k] = U[k] @ V`` with ``U`` [T, R] and ``V`` [R, C*H*W].

This module imports numpy only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tokenize
import zipfile
from collections.abc import Callable
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
#: File name of a compressed table inside an artifact or a folder.
COMPRESSED_FILENAME = "eta.npz"


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
    """Calibration offsets eta for every model input time, with the sidecar metadata.

    ``values`` is the dense float32 table [T, C, H, W]. For a table read from a compressed file,
    ``compressed`` is its ``KnotEta`` or ``LowRankEta`` form, ``values`` contains that form's rows
    at the integer times, and ``at`` and ``sha256`` use the compressed form.
    """

    values: np.ndarray
    metadata: dict[str, Any] | None = None
    path: Path | None = None
    compressed: KnotEta | LowRankEta | None = None

    @property
    def num_timesteps(self) -> int:
        return int(self.values.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, channels, height, width = self.values.shape
        return int(channels), int(height), int(width)

    @property
    def sha256(self) -> str:
        """Digest of the float32 values, or of the compressed arrays for a compressed table."""
        if self.compressed is not None:
            return self.compressed.sha256
        return sha256_array(self.values)

    def at(self, timestep: np.ndarray) -> np.ndarray:
        """Return eta at model input times ``timestep`` [B] as float32 [B, C, H, W].

        Times are clamped to [0, T-1] and interpolated linearly between rows floor(t) and
        floor(t) + 1, so an integer time returns its row exactly. The weight ``w`` is computed
        in float64 and the blend in float32. A compressed table applies its own rule (see the
        module docstring).
        """
        if self.compressed is not None:
            return self.compressed.at(timestep)
        return _interpolate_rows(self.values.__getitem__, timestep, self.num_timesteps)


def neighbour_rows(
    timestep: np.ndarray, num_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (lo, hi, w) of the interpolation rule for model input times ``timestep`` [B].

    ``lo = floor(t')`` and ``hi = min(lo + 1, T-1)`` are int64 and ``w = t' - lo`` is float32,
    with ``t' = clip(t, 0, T-1)`` computed in float64. Raises unless ``timestep`` is a finite 1-D
    array.
    """
    clamped = clamped_times(timestep, num_rows)
    lower = np.floor(clamped).astype(np.int64)
    upper = np.minimum(lower + 1, num_rows - 1)
    return lower, upper, (clamped - lower).astype(np.float32)


def clamped_times(timestep: np.ndarray, num_rows: int) -> np.ndarray:
    """Check that ``timestep`` is a finite 1-D array and clip it to [0, T-1] in float64."""
    timestep = np.asarray(timestep, dtype=np.float64)
    if timestep.ndim != 1:
        raise CalibexportError(
            f"timestep must be a 1-D array [B], got shape {list(timestep.shape)}; "
            "pass one model input time per sample."
        )
    if not np.all(np.isfinite(timestep)):
        bad = timestep[~np.isfinite(timestep)][:4].tolist()
        raise CalibexportError(f"timestep contains non-finite values {bad}; pass finite times.")
    return np.clip(timestep, 0.0, float(num_rows - 1))


@dataclass(frozen=True)
class KnotEta:
    """eta stored at integer knot times and interpolated linearly between neighbouring knots.

    ``knots`` is int64 [K], strictly increasing from 0 to T-1 with K >= 2; ``rows`` is float32
    [K, C, H, W], the table rows at those times.
    """

    knots: np.ndarray
    rows: np.ndarray
    kind: str = "knots"

    def __post_init__(self) -> None:
        _check_knots(self.knots, self.rows)

    @property
    def num_timesteps(self) -> int:
        return int(self.knots[-1]) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(dim) for dim in self.rows.shape[1:])  # type: ignore[return-value]

    @property
    def sha256(self) -> str:
        return compressed_sha256(self.kind, self.arrays())

    @property
    def nbytes(self) -> int:
        return int(self.knots.nbytes + self.rows.nbytes)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the ``.npz`` file, by name."""
        return {"knots": self.knots, "rows": self.rows}

    @property
    def row_segments(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (j, w_k) for every integer time k: int64 [T] and float32 [T]."""
        times = np.arange(self.num_timesteps)
        segment = np.minimum(np.searchsorted(self.knots, times, side="right") - 1,
                             len(self.knots) - 2)
        start, end = self.knots[segment], self.knots[segment + 1]
        return segment, ((times - start) / (end - start)).astype(np.float32)

    def rows_at(self, index: np.ndarray) -> np.ndarray:
        """Return the rows at integer times ``index`` (int64 [B]) as float32 [B, C, H, W]."""
        segment, weight = self.row_segments
        segment, weight = segment[index], weight[index][:, None, None, None]
        low_rows = self.rows[segment]
        return low_rows + weight * (self.rows[segment + 1] - low_rows)

    def at(self, timestep: np.ndarray) -> np.ndarray:
        """Return eta at model input times [B] as float32 [B, C, H, W] (see the module rule)."""
        return _interpolate_rows(self.rows_at, timestep, self.num_timesteps)

    def dense(self) -> np.ndarray:
        """Return the rows at every integer time 0..T-1 as float32 [T, C, H, W]."""
        return self.rows_at(np.arange(self.num_timesteps))


@dataclass(frozen=True)
class LowRankEta:
    """eta of rank R in time: ``eta[k] = time_factors[k] @ pixel_factors``.

    ``time_factors`` is float32 [T, R] (the left singular vectors times the singular values) and
    ``pixel_factors`` is float32 [R, C, H, W].
    """

    time_factors: np.ndarray
    pixel_factors: np.ndarray
    kind: str = "lowrank"

    def __post_init__(self) -> None:
        _check_low_rank(self.time_factors, self.pixel_factors)

    @property
    def num_timesteps(self) -> int:
        return int(self.time_factors.shape[0])

    @property
    def rank(self) -> int:
        return int(self.time_factors.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(dim) for dim in self.pixel_factors.shape[1:])  # type: ignore[return-value]

    @property
    def sha256(self) -> str:
        return compressed_sha256(self.kind, self.arrays())

    @property
    def nbytes(self) -> int:
        return int(self.time_factors.nbytes + self.pixel_factors.nbytes)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the ``.npz`` file, by name."""
        return {"time_factors": self.time_factors, "pixel_factors": self.pixel_factors}

    def rows_at(self, index: np.ndarray) -> np.ndarray:
        """Return the rows at integer times ``index`` (int64 [B]) as float32 [B, C, H, W]."""
        flat = self.pixel_factors.reshape(self.rank, -1)
        return (self.time_factors[index] @ flat).reshape(len(index), *self.image_shape)

    def at(self, timestep: np.ndarray) -> np.ndarray:
        """Return eta at model input times [B] as float32 [B, C, H, W] (see the module rule)."""
        return _interpolate_rows(self.rows_at, timestep, self.num_timesteps)

    def dense(self) -> np.ndarray:
        """Return the rows at every integer time 0..T-1 as float32 [T, C, H, W]."""
        return self.rows_at(np.arange(self.num_timesteps))


def _interpolate_rows(
    rows_at: Callable[[np.ndarray], np.ndarray], timestep: np.ndarray, num_rows: int
) -> np.ndarray:
    """Apply the dense table's rule to rows computed by ``rows_at`` (int64 [B] -> [B, C, H, W])."""
    lower, upper, weight = neighbour_rows(timestep, num_rows)
    low_rows = rows_at(lower)
    return low_rows + weight[:, None, None, None] * (rows_at(upper) - low_rows)


#: Compressed forms by the ``kind`` stored in their ``.npz`` file.
COMPRESSED_KINDS = {"knots": KnotEta, "lowrank": LowRankEta}


def compressed_sha256(kind: str, arrays: dict[str, np.ndarray]) -> str:
    """Digest of a compressed form: its kind and each array's ``sha256_array`` in name order."""
    digest = hashlib.sha256(kind.encode())
    for name in sorted(arrays):
        digest.update(f"{name}:{sha256_array(arrays[name])}".encode())
    return digest.hexdigest()


def _check_knots(knots: np.ndarray, rows: np.ndarray) -> None:
    if not (isinstance(knots, np.ndarray) and knots.dtype == np.int64 and knots.ndim == 1):
        raise CalibexportError("knot times must be a 1-D int64 array.")
    if len(knots) < 2 or knots[0] != 0 or np.any(np.diff(knots) <= 0):
        raise CalibexportError(
            f"knot times must increase strictly from 0 to T-1 with at least 2 knots, got "
            f"{knots[:8].tolist()}{'...' if len(knots) > 8 else ''}; compress the table again."
        )
    _check_float32(rows, "knot rows", 4)
    if rows.shape[0] != len(knots):
        raise CalibexportError(
            f"there are {len(knots)} knot times but {rows.shape[0]} knot rows; the file is "
            "inconsistent, so compress the table again."
        )


def _check_low_rank(time_factors: np.ndarray, pixel_factors: np.ndarray) -> None:
    _check_float32(time_factors, "time factors", 2)
    _check_float32(pixel_factors, "pixel factors", 4)
    if time_factors.shape[1] != pixel_factors.shape[0] or time_factors.shape[1] < 1:
        raise CalibexportError(
            f"time factors {list(time_factors.shape)} and pixel factors "
            f"{list(pixel_factors.shape)} do not share a rank >= 1; compress the table again."
        )


def _check_float32(array: np.ndarray, name: str, ndim: int) -> None:
    if not (isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == ndim):
        raise CalibexportError(
            f"{name} must be a {ndim}-D float32 array, got "
            f"{getattr(array, 'dtype', type(array).__name__)} {list(np.shape(array))}."
        )
    if not np.all(np.isfinite(array)):
        raise CalibexportError(f"{name} contain NaN or Inf; compress the table again.")


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
    """Read an eta table and its sidecar, if present.

    ``path`` is an ``eta.npy`` file, a compressed ``.npz`` file (``KnotEta`` or ``LowRankEta``), or
    a folder that contains ``eta.npy`` or ``eta.npz``. Checks that the array is 4-D, float32 or
    float64 (cast to float32) and finite, and that the sidecar's ``eta_sha256`` matches the
    values (the compressed arrays for a ``.npz``). A bare file without a sidecar is accepted.
    """
    table_path = locate_table(path)
    compressed = None
    if table_path.suffix == ".npz":
        compressed = _read_compressed(table_path)
        values = compressed.dense()
        digest = compressed.sha256
    else:
        values = _read_values(table_path)
        digest = sha256_array(values)

    sidecar_path = sidecar_path_for(table_path)
    metadata = None
    if sidecar_path.is_file():
        metadata = _read_sidecar(sidecar_path)
        _check_sidecar(metadata, values, table_path, sidecar_path, digest)
        _check_compression_kind(metadata, compressed, table_path, sidecar_path)
    else:
        logger.info(
            "eta table %s has no sidecar %s; schedule and model details will come from the model.",
            table_path,
            sidecar_path.name,
        )
    return EtaTable(values=values, metadata=metadata, path=table_path, compressed=compressed)


def locate_table(path: str | Path) -> Path:
    """Return the table file that ``load_eta_table`` reads for ``path``; raise if there is none.

    A ``.npy`` or ``.npz`` path is the file itself. Any other path is a folder that must contain
    exactly one of ``eta.npy`` and ``eta.npz``, because both would share the sidecar ``eta.json``.
    """
    path = Path(path)
    if path.suffix in (".npy", ".npz") and not path.is_dir():
        if not path.is_file():
            raise CalibexportError(
                f"eta table {path} not found; pass an eta.npy or .npz file or the folder that "
                "contains it."
            )
        return path
    candidates = [path / name for name in (TABLE_FILENAME, COMPRESSED_FILENAME)]
    found = [candidate for candidate in candidates if candidate.is_file()]
    if len(found) == 2:
        raise CalibexportError(
            f"{path} contains both {TABLE_FILENAME} and {COMPRESSED_FILENAME}, which would share "
            "one eta.json sidecar; pass the table file you mean, and keep the other elsewhere."
        )
    if not found:
        raise CalibexportError(
            f"eta table {candidates[0]} not found; pass an eta.npy or .npz file or the folder "
            "that contains it."
        )
    return found[0]


# Exceptions np.load raises for a damaged file, because numpy parses the header with the tokenize and ast
# modules, and a damaged shape can request more memory than exists.
_DAMAGED_NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError,
                       MemoryError)


def _read_compressed(table_path: Path) -> KnotEta | LowRankEta:
    """Read a compressed table: a ``.npz`` with a 0-d string ``kind`` and that form's arrays."""
    try:
        with np.load(table_path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (*_DAMAGED_NPY_ERRORS, zipfile.BadZipFile) as error:
        raise CalibexportError(
            f"cannot read compressed eta table {table_path}: the file is truncated or not a .npz "
            f"archive ({error}); compress the table again."
        ) from error
    kind = str(arrays.pop("kind", ""))
    if kind not in COMPRESSED_KINDS:
        raise CalibexportError(
            f"compressed eta table {table_path} has kind {kind!r}; valid kinds: "
            f"{', '.join(COMPRESSED_KINDS)}. Write it with calibexport compress."
        )
    form = COMPRESSED_KINDS[kind]
    expected = sorted(form.__dataclass_fields__.keys() - {"kind"})
    if sorted(arrays) != expected:
        raise CalibexportError(
            f"compressed eta table {table_path} of kind {kind!r} contains arrays {sorted(arrays)}, "
            f"expected {expected}; compress the table again."
        )
    return form(**arrays)


def _check_compression_kind(
    metadata: dict[str, Any],
    compressed: KnotEta | LowRankEta | None,
    table_path: Path,
    sidecar_path: Path,
) -> None:
    recorded = (metadata.get("compression") or {}).get("kind")
    actual = compressed.kind if compressed is not None else None
    if recorded != actual:
        raise CalibexportError(
            f"eta sidecar {sidecar_path} records compression {recorded!r} but {table_path} is "
            f"{'a ' + repr(actual) + ' table' if actual else 'a dense table'}; the two files "
            "belong to different tables."
        )


def _read_values(table_path: Path) -> np.ndarray:
    try:
        # A memory map checks the header's shape against the file size before anything is
        # allocated; the copy then detaches the values from the file.
        values = np.array(np.load(table_path, allow_pickle=False, mmap_mode="r"))
    except _DAMAGED_NPY_ERRORS as error:
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
    if values.shape[0] == 0:
        raise CalibexportError(
            f"eta table {table_path} has no rows (shape {list(values.shape)}); estimate it again."
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
    metadata: dict[str, Any], values: np.ndarray, table_path: Path, sidecar_path: Path,
    actual: str,
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
        if recorded != actual:
            raise CalibexportError(
                f"eta table {table_path} does not match its sidecar: sha256 {actual[:16]}... "
                f"but the sidecar records {str(recorded)[:16]}...; the table was changed or "
                "only partly written, so estimate it again."
            )
