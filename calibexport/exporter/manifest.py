"""Writing an artifact's ``manifest.json``. The reader is ``calibexport.runtime.artifact``."""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.exporter.atomic import atomic_write_text
from calibexport.hashing import sha256_file
from calibexport.runtime.artifact import (
    MANIFEST_FILENAME,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    Manifest,
)

__all__ = ["MANIFEST_FILENAME", "MANIFEST_VERSION", "build_manifest", "write_manifest"]

logger = logging.getLogger(__name__)

#: Files hashed into every manifest, relative to the artifact directory.
DEFAULT_FILES = ("model.onnx", "eta.npy")
_VERSIONED_PACKAGES = ("calibexport", "torch", "onnx", "onnxruntime", "numpy")
# The eta lookup of the folded graph, stated for readers of the manifest.
_INTERPOLATION_RULES = {
    "linear": "t' = clip(t, 0, T-1); lo = floor(t'); hi = min(lo + 1, T-1); w = t' - lo; "
              "eta = table[lo] + w * (table[hi] - table[lo])",
    "exact": "eta = table[clip(t, 0, T-1)] for integer t",
}


def build_manifest(
    artifact_dir: str | Path,
    *,
    schedule: Mapping[str, Any],
    prediction_type: str,
    image_shape: Iterable[int],
    num_timesteps: int,
    weights_sha256: str,
    model_path: str | Path,
    config: str | None,
    weights: str,
    export_info: Any,
    timestep_dtype: str = "float32",
    timestep_input: str = "t",
    eta_sha256: str | None = None,
    files: Iterable[str] = DEFAULT_FILES,
    source_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the manifest document for the files already written in ``artifact_dir``.

    ``files`` are hashed with sha256, and each must exist. ``model_path``, ``config`` (a preset
    name or a config file path) and ``weights`` (ema/model) identify the source network for
    reloading it, and ``source_extra`` adds further source fields. ``export_info`` is the
    ``ExportInfo`` of the ONNX export (anything with ``to_dict()``, a mapping, or None).
    ``eta_sha256`` is the digest of the table values (``calibexport.hashing.sha256_array``).
    """
    artifact_dir = Path(artifact_dir)
    shape = [int(d) for d in image_shape]
    if len(shape) != 3:
        raise CalibexportError(f"image_shape must be [C, H, W], got {shape}.")
    if num_timesteps < 1:
        raise CalibexportError(f"num_timesteps must be >= 1, got {num_timesteps}.")
    dtype = np.dtype(timestep_dtype).name
    interpolation = "exact" if np.issubdtype(np.dtype(dtype), np.integer) else "linear"

    source = {"model_path": str(model_path), "config": config, "weights": weights,
              "weights_sha256": weights_sha256, **dict(source_extra or {})}
    document = {
        "format": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prediction_type": prediction_type,
        "schedule": dict(schedule),
        "image_shape": shape,
        "timestep": {
            "input": timestep_input,
            "dtype": dtype,
            "num_timesteps": int(num_timesteps),
            "range": [0, int(num_timesteps) - 1],
            "interpolation": interpolation,
            "rule": _INTERPOLATION_RULES[interpolation],
        },
        "eta": {"values_sha256": eta_sha256},
        "files": _hash_files(artifact_dir, files),
        "source": source,
        "export": _export_dict(export_info),
        "versions": _versions(),
    }
    # Fail here, not at load time, when the document would not parse back.
    Manifest.from_dict(json.loads(json.dumps(document)), where="the new manifest")
    return document


def write_manifest(artifact_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest`` atomically as ``artifact_dir/manifest.json`` and return that path."""
    path = Path(artifact_dir) / MANIFEST_FILENAME
    try:
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise CalibexportError(f"the manifest is not JSON-serialisable: {exc}") from exc
    atomic_write_text(path, text)
    logger.info("Wrote %s.", path)
    return path


def _hash_files(artifact_dir: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    entries = {}
    for name in names:
        path = artifact_dir / name
        if not path.is_file():
            raise CalibexportError(
                f"{path} not found; write every artifact file before building the manifest."
            )
        entries[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def _export_dict(export_info: Any) -> dict[str, Any]:
    if export_info is None:
        return {}
    entries = dict(export_info.to_dict() if hasattr(export_info, "to_dict") else export_info)
    # The export path is a temporary file of the build, meaningless once the artifact is installed.
    entries.pop("path", None)
    return entries


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
