"""Writing eta tables: ``eta.npy`` (float32 [T, C, H, W]) and the ``eta.json`` sidecar.

Both files are written to temporary names in the target folder and then renamed with
``os.replace``, so a failed write leaves any earlier table in place and no partial file behind.
If the process dies between the two renames, the sidecar's ``eta_sha256`` no longer matches the
array and ``load_eta_table`` rejects the pair. Reading lives in ``calibexport.runtime.eta_table``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TYPE_CHECKING, Any

import numpy as np

import calibexport
from calibexport.errors import CalibexportError
from calibexport.hashing import sha256_array
from calibexport.runtime.eta_table import (
    FORMAT_VERSION,
    SIDECAR_FORMAT,
    resolve_table_path,
    sidecar_path_for,
)
from calibexport.runtime.schedule import VPSchedule

if TYPE_CHECKING:
    from calibexport.calibration_tables.estimate import EtaEstimate

logger = logging.getLogger(__name__)


def build_sidecar(
    estimate: EtaEstimate,
    *,
    schedule: VPSchedule | dict[str, Any],
    data_description: dict[str, Any],
    weights_sha256: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the sidecar metadata for an estimated table.

    ``data_description`` comes from ``describe_data`` and ``weights_sha256`` is the digest of
    the model weights the table was estimated for. ``extra`` adds keys under ``"extra"``.
    """
    from calibexport.calibration_tables.estimate import row_standard_error_summary

    eta = np.asarray(estimate.eta, dtype=np.float32)
    if eta.ndim != 4:
        raise CalibexportError(f"eta must be 4-D [T, C, H, W], got shape {list(eta.shape)}.")
    spec = schedule if isinstance(schedule, dict) else schedule.to_spec()
    num_timesteps, channels, height, width = (int(dim) for dim in eta.shape)
    metadata: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "format_version": FORMAT_VERSION,
        "schedule": dict(spec),
        "num_timesteps": num_timesteps,
        "channels": channels,
        "height": height,
        "width": width,
        "data": dict(data_description),
        "num_samples": int(estimate.num_samples),
        "estimator": estimate.estimator,
        "seed": estimate.seed,
        "standard_error": row_standard_error_summary(estimate.standard_error),
        "sampling": estimate.sampling_summary(),
        "model_weights_sha256": weights_sha256,
        "eta_sha256": sha256_array(eta),
        "calibexport_version": calibexport.__version__,
        "torch_version": _torch_version(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        metadata["extra"] = dict(extra)
    return metadata


def save_eta_table(path: str | Path, eta: np.ndarray, metadata: dict[str, Any] | None) -> None:
    """Write ``eta.npy`` and its sidecar atomically; ``path`` is the ``.npy`` file or a folder.

    ``metadata`` from ``build_sidecar`` must describe this array: a recorded ``eta_sha256`` that
    differs from the array's digest raises. With ``metadata=None`` only the array is written and
    an old sidecar next to it is removed, because it would describe another table.
    """
    table_path = resolve_table_path(path)
    eta = _checked_table(eta, table_path)
    if metadata is not None:
        metadata = _checked_metadata(metadata, eta)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    write_table_files(table_path, lambda handle: np.save(handle, eta, allow_pickle=False), metadata)
    logger.info("Saved eta table %s %s (sha256 %s).", table_path, list(eta.shape),
                sha256_array(eta)[:16])


def write_table_files(
    table_path: Path, write_table: Callable[[Any], None], metadata: dict[str, Any] | None
) -> None:
    """Write a table file (through ``write_table(handle)``) and its sidecar atomically.

    Both go to temporary names beside their targets and are renamed only when both are complete.
    With ``metadata=None`` an old sidecar is removed, because it would describe another table.
    """
    sidecar_path = sidecar_path_for(table_path)
    temporaries: list[Path] = []
    try:
        table_tmp = _temporary_beside(table_path, temporaries)
        with open(table_tmp, "wb") as handle:
            write_table(handle)
            _flush(handle)
        sidecar_tmp = None
        if metadata is not None:
            sidecar_tmp = _temporary_beside(sidecar_path, temporaries)
            with open(sidecar_tmp, "w", encoding="utf-8") as handle:
                json.dump(metadata, handle, indent=2, allow_nan=False)
                handle.write("\n")
                _flush(handle)

        os.replace(table_tmp, table_path)
        temporaries.remove(table_tmp)
        if sidecar_tmp is not None:
            os.replace(sidecar_tmp, sidecar_path)
            temporaries.remove(sidecar_tmp)
        elif sidecar_path.exists():
            sidecar_path.unlink()
            logger.info("Removed the old sidecar %s, which described another table.", sidecar_path)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def _checked_table(eta: np.ndarray, table_path: Path) -> np.ndarray:
    eta = np.asarray(eta)
    if eta.ndim != 4:
        raise CalibexportError(
            f"cannot save eta table {table_path}: the array must be 4-D [T, C, H, W], "
            f"got shape {list(eta.shape)}."
        )
    if not np.issubdtype(eta.dtype, np.floating):
        raise CalibexportError(
            f"cannot save eta table {table_path}: dtype {eta.dtype} is not a floating type."
        )
    eta = np.ascontiguousarray(eta, dtype=np.float32)
    finite_rows = np.isfinite(eta).reshape(eta.shape[0], -1).all(axis=1)
    if not finite_rows.all():
        raise CalibexportError(
            f"cannot save eta table {table_path}: row {int(np.argmin(finite_rows))} contains "
            "NaN or Inf; check the model's outputs at that timestep."
        )
    return eta


def _checked_metadata(metadata: dict[str, Any], eta: np.ndarray) -> dict[str, Any]:
    metadata = dict(metadata)
    actual = sha256_array(eta)
    recorded = metadata.setdefault("eta_sha256", actual)
    if recorded != actual:
        raise CalibexportError(
            f"the metadata records eta_sha256 {str(recorded)[:16]}... but the array to save has "
            f"{actual[:16]}...; build the sidecar from this table with build_sidecar."
        )
    for key, dim in zip(("num_timesteps", "channels", "height", "width"), eta.shape):
        recorded_dim = metadata.setdefault(key, int(dim))
        if recorded_dim != dim:
            raise CalibexportError(
                f"the metadata records {key}={recorded_dim} but the array has {dim} "
                f"(shape {list(eta.shape)}); build the sidecar from this table."
            )
    return metadata


def _temporary_beside(target: Path, temporaries: list[Path]) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    # mkstemp creates mode 0600; give the table the mode any new file gets under the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    temporaries.append(Path(name))
    return Path(name)


def _flush(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)
