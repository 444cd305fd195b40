"""Fold an eta table into an existing ONNX file without torch: the ``calibexport fold`` command.

The source network can come from any exporter. Its timestep input is found by rank and dtype
(or named), and keeps its dtype. An x0 or v network needs the noise schedule, which is read from
``--schedule``, else from the table's ``eta.json`` sidecar, else from the ``calibexport.schedule``
metadata of the ONNX file. This module needs onnx, onnxscript and numpy, never torch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from calibexport.errors import CalibexportError
from calibexport.exporter.fold import find_timestep_input, fold_eta
from calibexport.exporter.onnx_utils import save_onnx
from calibexport.runtime.eta_table import EtaTable, load_eta_table
from calibexport.runtime.prediction import check_prediction_type, table_log_alpha
from calibexport.runtime.schedule import DiscreteVPSchedule, schedule_from_spec

logger = logging.getLogger(__name__)

#: Metadata key of the schedule spec (JSON) in calibrated ONNX files.
SCHEDULE_METADATA_KEY = "calibexport.schedule"


@dataclass
class FoldResult:
    """The file ``fold_file`` wrote, and the timestep input and schedule it used."""

    out: Path
    timestep_input: str
    timestep_dtype: str
    prediction_type: str
    schedule_source: str | None
    num_rows: int
    seconds: float


def fold_file(
    onnx_path: str | Path,
    eta_path: str | Path,
    out: str | Path,
    *,
    timestep_input: str | None = None,
    output: str | None = None,
    prediction_type: str = "eps",
    schedule: str | dict[str, Any] | None = None,
    optimize: bool = True,
    overwrite: bool = False,
) -> FoldResult:
    """Write ``out``: the network in ``onnx_path`` with the table ``eta_path`` folded in.

    ``schedule`` is a schedule spec, a JSON file containing one, or None to take it from the
    table's sidecar or the ONNX metadata. ``optimize`` runs constant folding and shape inference
    on the result (``calibexport.exporter.optimize``). ``out`` is written atomically and an
    existing file is replaced only with ``overwrite``.
    """
    start = time.perf_counter()
    onnx_path, out = Path(onnx_path), Path(out)
    check_prediction_type(prediction_type)
    if out.exists() and not overwrite:
        raise CalibexportError(f"{out} already exists; pass --overwrite to replace it.")
    if out.resolve() == onnx_path.resolve():
        raise CalibexportError(f"--out {out} is the source file; write to another path.")
    model = _load(onnx_path)
    table = load_eta_table(eta_path)
    spec, spec_source = _resolve_schedule(schedule, table, model)
    if spec is not None:
        _check_rows(table, spec, spec_source)

    log_alpha = None
    if prediction_type != "eps":
        if spec is None:
            raise CalibexportError(
                f"folding eta into a {prediction_type} network needs its noise schedule, and "
                "neither --schedule, the table's eta.json nor the ONNX metadata gives one. Pass "
                "--schedule with a JSON file such as "
                '{"kind": "discrete", "beta_schedule": "linear", "beta_start": 0.0001, '
                '"beta_end": 0.02, "num_timesteps": 1000}.'
            )
        log_alpha = table_log_alpha(schedule_from_spec(spec), table.num_timesteps)

    timestep = find_timestep_input(model.graph, timestep_input)
    metadata = {
        "calibexport.prediction_type": prediction_type,
        "calibexport.eta_sha256": table.sha256,
        "calibexport.timestep_input": timestep.name,
        "calibexport.source_onnx": onnx_path.name,
    }
    if spec is not None:
        metadata[SCHEDULE_METADATA_KEY] = json.dumps(spec, sort_keys=True)
    folded = fold_eta(model, table.values, timestep_input=timestep.name, output=output,
                      prediction_type=prediction_type, log_alpha=log_alpha, metadata=metadata)
    if optimize:
        from calibexport.exporter.optimize import optimize_graph

        folded = optimize_graph(folded)
    save_onnx(folded, out)

    seconds = time.perf_counter() - start
    timestep_type = onnx.helper.tensor_dtype_to_np_dtype(timestep.type.tensor_type.elem_type)
    logger.info("Folded %s into %s: %s -> %s in %.1fs. Done.", table.path, onnx_path, out,
                prediction_type, seconds)
    return FoldResult(out=out, timestep_input=timestep.name, timestep_dtype=timestep_type.name,
                      prediction_type=prediction_type, schedule_source=spec_source,
                      num_rows=table.num_timesteps, seconds=seconds)


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise CalibexportError(f"ONNX file not found: {path}; pass the network export with --onnx.")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError and others
        raise CalibexportError(
            f"could not read ONNX file {path}: {exc}; the file is truncated or not ONNX."
        ) from exc


def _resolve_schedule(schedule: str | dict[str, Any] | None, table: EtaTable,
                      model: onnx.ModelProto) -> tuple[dict[str, Any] | None, str | None]:
    """Return (schedule spec, where it came from), or (None, None) when nothing gives one."""
    if isinstance(schedule, dict):
        return dict(schedule), "argument"
    if schedule is not None:
        return _read_schedule_file(Path(schedule)), str(schedule)
    if table.metadata is not None and isinstance(table.metadata.get("schedule"), dict):
        return dict(table.metadata["schedule"]), f"{table.path} sidecar"
    for prop in model.metadata_props:
        if prop.key == SCHEDULE_METADATA_KEY:
            try:
                return dict(json.loads(prop.value)), "ONNX metadata"
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise CalibexportError(
                    f"the ONNX metadata {SCHEDULE_METADATA_KEY} is not a JSON object ({exc}); "
                    "pass --schedule."
                ) from exc
    return None, None


def _read_schedule_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibexportError(
            f"could not read schedule file {path}: {exc}; pass a JSON file with a schedule spec."
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("schedule"), dict):
        data = data["schedule"]  # a model config or a sidecar that contains the schedule
    if not isinstance(data, dict) or "kind" not in data:
        raise CalibexportError(
            f"schedule file {path} has no schedule spec (a JSON object with 'kind': 'discrete' "
            "or 'linear')."
        )
    schedule_from_spec(data)  # raises with the reason when the spec is invalid
    return data


def _check_rows(table: EtaTable, spec: dict[str, Any], source: str | None) -> None:
    schedule = schedule_from_spec(spec)
    if isinstance(schedule, DiscreteVPSchedule) and schedule.num_timesteps != table.num_timesteps:
        raise CalibexportError(
            f"eta table {table.path} has {table.num_timesteps} rows but the schedule from "
            f"{source} has {schedule.num_timesteps} steps; use the table estimated for this model "
            "and schedule."
        )
