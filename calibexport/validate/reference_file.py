"""Saved reference outputs: a JSON file that ``validate --reference`` compares a new run with.

The file stores the inputs and the reference outputs of every check, so a deployed engine on
another machine can be compared with a reference computed elsewhere, without PyTorch. Arrays are
objects ``{"dtype": "float32", "shape": [...], "data": BASE64}`` where ``data`` contains the
little-endian, C-order bytes. docs/validation.md documents the layout.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.validate.parity import (
    EvaluationCase,
    ReferenceOutputs,
    SamplingRun,
    TrajectoryRecord,
)

logger = logging.getLogger(__name__)

REFERENCE_FORMAT = "calibexport.parity-reference"
REFERENCE_VERSION = 1


def encode_array(array: np.ndarray) -> dict[str, Any]:
    array = np.asarray(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": base64.b64encode(np.ascontiguousarray(little).tobytes()).decode("ascii"),
    }


def decode_array(value: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(value["dtype"]).newbyteorder("<")
    raw = base64.b64decode(value["data"])
    return np.frombuffer(raw, dtype=dtype).reshape(value["shape"]).astype(dtype.name)


def save_reference(path: Path, outputs: ReferenceOutputs, artifact: dict[str, Any]) -> None:
    """Write ``outputs`` and the artifact facts they belong to (digests, schedule, shapes)."""
    from calibexport.exporter.atomic import atomic_write_text

    document = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "source": outputs.source,
        "artifact": artifact,
        "seed": outputs.seed,
        "num_samples": outputs.num_samples,
        "evaluations": [
            {
                "name": case.name,
                "description": case.description,
                "batch_size": case.batch_size,
                "timesteps": encode_array(case.timesteps),
                "x": encode_array(case.x),
                "eps": encode_array(case.eps),
            }
            for case in outputs.evaluations
        ],
        "trajectories": [
            {
                "method": record.run.method,
                "order": record.run.order,
                "steps": record.run.steps,
                "x_T": encode_array(record.x_T),
                "step_t": encode_array(record.step_t),
                "states": encode_array(record.states),
                "final": encode_array(record.final),
            }
            for record in outputs.trajectories
        ],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(document) + "\n")
    logger.info("Saved the reference outputs to %s", path)


def load_reference(path: Path) -> tuple[ReferenceOutputs, dict[str, Any]]:
    """Read a file written by ``save_reference``; return the outputs and the artifact facts."""
    path = Path(path)
    if not path.is_file():
        raise CalibexportError(
            f"reference file {path} not found; write one with `calibexport validate "
            f"--save-reference FILE` on the reference machine."
        )
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CalibexportError(f"reference file {path} is not readable JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != REFERENCE_FORMAT:
        raise CalibexportError(
            f"{path} is not a calibexport reference file (format {REFERENCE_FORMAT!r}); pass a "
            f"file written by `calibexport validate --save-reference`."
        )
    if document.get("version") != REFERENCE_VERSION:
        raise CalibexportError(
            f"reference file {path} has version {document.get('version')!r}; this release reads "
            f"version {REFERENCE_VERSION}. Save the reference again with this release."
        )
    try:
        return _parse(document), dict(document["artifact"])
    except (KeyError, TypeError, ValueError) as error:
        raise CalibexportError(
            f"reference file {path} is incomplete or damaged ({type(error).__name__}: {error}); "
            f"save it again."
        ) from None


def _parse(document: dict[str, Any]) -> ReferenceOutputs:
    cases = [
        EvaluationCase(
            name=item["name"],
            description=item["description"],
            batch_size=int(item["batch_size"]),
            timesteps=decode_array(item["timesteps"]),
            x=decode_array(item["x"]),
            eps=decode_array(item["eps"]),
        )
        for item in document["evaluations"]
    ]
    trajectories = [
        TrajectoryRecord(
            run=SamplingRun(str(item["method"]), int(item["order"]), int(item["steps"])),
            x_T=decode_array(item["x_T"]),
            step_t=decode_array(item["step_t"]),
            states=decode_array(item["states"]),
            final=decode_array(item["final"]),
        )
        for item in document["trajectories"]
    ]
    return ReferenceOutputs(
        source=dict(document["source"]),
        evaluations=cases,
        trajectories=trajectories,
        seed=int(document["seed"]),
        num_samples=int(document["num_samples"]),
    )
