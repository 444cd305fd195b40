"""Deliberately broken copies of an artifact, to check that a validation gate rejects them.

Each function changes one initializer of ``model.onnx`` and re-signs the manifest, so the result
looks like a consistent build whose numbers drifted: only the parity checks can catch it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.hashing import sha256_file

logger = logging.getLogger(__name__)


def perturb_initializer(artifact: Path, select: Callable[[object], bool],
                        change: Callable[[np.ndarray], None]) -> str:
    """Apply ``change`` in place to the one initializer that ``select`` picks; return its name."""
    import onnx
    from onnx import numpy_helper

    path = Path(artifact) / "model.onnx"
    model = onnx.load(str(path))
    chosen = [init for init in model.graph.initializer if select(init)]
    if len(chosen) != 1:
        raise CalibexportError(
            f"expected one matching initializer in {path}, found "
            f"{[init.name for init in chosen][:5]} ({len(chosen)} in all)."
        )
    values = numpy_helper.to_array(chosen[0]).copy()
    change(values)
    chosen[0].CopyFrom(numpy_helper.from_array(values, chosen[0].name))
    onnx.save(model, str(path))

    manifest_path = Path(artifact) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.onnx"]["sha256"] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("Perturbed initializer %s of %s", chosen[0].name, path)
    return chosen[0].name


def shift_eta_row(artifact: Path, row: int, delta: float) -> str:
    """Add ``delta`` to row ``row`` of the folded eta table (the [T, C, H, W] initializer)."""
    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    table_shape = [int(manifest["timestep"]["num_timesteps"]), *manifest["image_shape"]]

    def shift(values: np.ndarray) -> None:
        values[row] += np.asarray(delta, dtype=values.dtype)

    return perturb_initializer(artifact, lambda init: list(init.dims) == table_shape, shift)


def shift_weight(artifact: Path, name_suffix: str, delta: float) -> str:
    """Add ``delta`` to every element of the initializer whose name ends with ``name_suffix``."""

    def shift(values: np.ndarray) -> None:
        values += np.asarray(delta, dtype=values.dtype)

    return perturb_initializer(artifact, lambda init: init.name.endswith(name_suffix), shift)
