"""Reading an artifact's ``manifest.json`` and checking the files it lists.

The manifest records what a runtime needs to use ``model.onnx`` without guessing. That is the
noise schedule, the prediction type, the image shape, the timestep input and how eta is looked up
between table rows. It also records sha256 digests of the artifact files and the source weights.
This module imports numpy and the standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibexport.errors import CalibexportError
from calibexport.hashing import sha256_file

#: Layout version that this release writes and reads.
MANIFEST_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
#: Value of the manifest's ``format`` field.
MANIFEST_FORMAT = "calibexport.artifact"

_REQUIRED_KEYS = (
    "manifest_version", "schedule", "prediction_type", "image_shape", "timestep", "files", "source",
)


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of an artifact directory.

    ``files`` maps each file name, relative to the artifact directory, to its sha256.
    ``timestep`` contains ``input``, ``dtype``, ``num_timesteps``, ``range`` and ``interpolation``.
    ``raw`` is the whole JSON document.
    """

    version: int
    schedule: dict[str, Any]
    prediction_type: str
    image_shape: tuple[int, int, int]
    timestep: dict[str, Any]
    files: dict[str, str]
    source: dict[str, Any]
    weights_sha256: str
    export: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def timestep_input(self) -> str:
        return str(self.timestep["input"])

    @property
    def timestep_dtype(self) -> str:
        return str(self.timestep["dtype"])

    @property
    def num_timesteps(self) -> int:
        return int(self.timestep["num_timesteps"])

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        """Parse a manifest document. ``where`` names it in error messages."""
        version = data.get("manifest_version")
        if version != MANIFEST_VERSION:
            raise CalibexportError(
                f"{where} has manifest_version {version!r}; this release of calibexport reads "
                f"version {MANIFEST_VERSION} only. Rebuild the artifact with this release."
            )
        missing = [key for key in _REQUIRED_KEYS if key not in data]
        if missing:
            raise CalibexportError(f"{where} is missing the keys {missing}; rebuild the artifact.")
        try:
            files = {name: str(entry["sha256"]) for name, entry in data["files"].items()}
            image_shape = tuple(int(d) for d in data["image_shape"])
            weights_sha256 = str(data["source"]["weights_sha256"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CalibexportError(
                f"{where} is malformed ({exc!r}); rebuild the artifact."
            ) from exc
        if len(image_shape) != 3:
            raise CalibexportError(
                f"{where} has image_shape {list(image_shape)}; expected [C, H, W]."
            )
        return cls(
            version=version,
            schedule=dict(data["schedule"]),
            prediction_type=str(data["prediction_type"]),
            image_shape=image_shape,  # type: ignore[arg-type]
            timestep=dict(data["timestep"]),
            files=files,
            source=dict(data["source"]),
            weights_sha256=weights_sha256,
            export=dict(data.get("export", {})),
            versions=dict(data.get("versions", {})),
            created=str(data.get("created", "")),
            raw=data,
        )


def load_manifest(artifact_dir: str | Path) -> Manifest:
    """Read and check ``manifest.json`` of ``artifact_dir``, raising CalibexportError if invalid."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise CalibexportError(
            f"artifact directory {artifact_dir} not found; pass the --out directory of "
            "`calibexport build`."
        )
    path = artifact_dir / MANIFEST_FILENAME
    if not path.is_file():
        raise CalibexportError(
            f"{path} not found: {artifact_dir} is not a calibexport artifact, or its build did not "
            "finish. Rebuild it with `calibexport build`."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibexportError(f"{path} is unreadable or not valid JSON ({exc}); rebuild the "
                               "artifact.") from exc
    if not isinstance(data, dict):
        raise CalibexportError(f"{path} contains a JSON {type(data).__name__}, expected an object.")
    return Manifest.from_dict(data, where=str(path))


def verify_artifact_files(artifact_dir: str | Path, manifest: Manifest) -> None:
    """Recompute the sha256 of each file in ``manifest.files`` and raise naming every mismatch."""
    artifact_dir = Path(artifact_dir)
    problems = []
    for name, expected in sorted(manifest.files.items()):
        path = artifact_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        actual = sha256_file(path)
        if actual != expected:
            problems.append(f"{name}: sha256 {actual[:12]}..., manifest has {expected[:12]}...")
    if problems:
        raise CalibexportError(
            f"artifact {artifact_dir} does not match its manifest ({'; '.join(problems)}): the "
            "files were changed after the build. Rebuild the artifact."
        )
