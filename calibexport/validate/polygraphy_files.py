"""Inputs and reference outputs in Polygraphy's JSON formats, to reproduce checks with Polygraphy.

``inputs.json`` is a list of feed dicts (one per model call, as ``polygraphy run --load-inputs``
reads), ``outputs.json`` a Polygraphy ``RunResults`` with one iteration per feed (as
``--load-outputs`` reads) and ``iterations.json`` names the check and timesteps of each
iteration. Then ``polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs
outputs.json --atol A --rtol R`` runs the ONNX model on the same inputs and compares.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.validate.parity import ReferenceOutputs

logger = logging.getLogger(__name__)

RUNNER_NAME = "calibexport-reference"


def _iterations(outputs: ReferenceOutputs) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Return (check name, x, timestep, eps) per model call: the evaluation batches, then the
    network evaluations of the reference sampling runs."""
    items = []
    for case in outputs.evaluations:
        assert case.eps is not None, "reference outputs carry the reference eps"
        for batch in case.batches():
            items.append((case.name, case.x[batch], case.timesteps[batch], case.eps[batch]))
    for call in outputs.calls:
        items.append((call.label, call.x, call.timestep, call.eps))
    return items


def save_polygraphy_files(directory: Path, outputs: ReferenceOutputs, *, x_input: str,
                          timestep_input: str, timestep_dtype: np.dtype, output_name: str,
                          model_path: Path, tolerance: tuple[float, float]) -> dict[str, Any]:
    """Write inputs.json, outputs.json and iterations.json; return what the report records.

    ``tolerance`` is the (atol, rtol) written into the suggested ``polygraphy run`` command.
    """
    # Polygraphy prints its log lines to stdout, where validate prints the parity summary.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            from polygraphy.comparator import RunResults
            from polygraphy.json import save_json
        except ImportError as error:
            raise CalibexportError(
                f"--save-inputs needs the polygraphy package ({error}); install it with "
                f"`pip install polygraphy`."
            ) from None
        result = _write(directory, outputs, RunResults, save_json, x_input=x_input,
                        timestep_input=timestep_input, timestep_dtype=timestep_dtype,
                        output_name=output_name)
    for line in captured.getvalue().splitlines():
        logger.debug("polygraphy: %s", line)

    atol, rtol = tolerance
    result["command"] = shlex.join([
        "polygraphy", "run", str(model_path), "--onnxrt",
        "--load-inputs", result["inputs"], "--load-outputs", result["outputs"],
        "--atol", f"{atol:g}", "--rtol", f"{rtol:g}",
    ])
    return result


def _write(directory: Path, outputs: ReferenceOutputs, run_results_type: Any, save_json: Any, *,
           x_input: str, timestep_input: str, timestep_dtype: np.dtype,
           output_name: str) -> dict[str, Any]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    feeds, results, index = [], [], []
    for number, (label, x, timestep, eps) in enumerate(_iterations(outputs)):
        feeds.append({
            x_input: np.ascontiguousarray(x, dtype=np.float32),
            timestep_input: np.asarray(timestep).astype(timestep_dtype),
        })
        results.append({output_name: np.asarray(eps)})
        index.append({"iteration": number, "check": label,
                      "timesteps": np.asarray(timestep, dtype=np.float64).tolist()})

    run_results = run_results_type()
    run_results.add(results, runner_name=RUNNER_NAME)
    save_json(feeds, str(directory / "inputs.json"), description="calibexport parity inputs")
    run_results.save(str(directory / "outputs.json"))
    (directory / "iterations.json").write_text(json.dumps(index, indent=1) + "\n")
    logger.info("Saved %d Polygraphy iterations to %s", len(feeds), directory)
    return {
        "directory": str(directory),
        "inputs": str(directory / "inputs.json"),
        "outputs": str(directory / "outputs.json"),
        "iterations": str(directory / "iterations.json"),
        "num_iterations": len(feeds),
        "runner_name": RUNNER_NAME,
    }
