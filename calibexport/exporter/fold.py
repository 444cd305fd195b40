"""Fold the calibration offset into an ONNX graph: ``eps_calibrated = eps - eta(t)``.

The table is stored as a float32 initializer [T, C, H, W]. For a floating-point timestep input
the graph computes, per sample,

    t' = clip(t, 0, T-1);  lo = floor(t');  hi = min(lo + 1, T-1);  w = t' - lo
    eta(t) = table[lo] + w * (table[hi] - table[lo])

which is the rule of ``calibexport.runtime.eta_table.EtaTable.at``. An integer timestep input
(int32 or int64) is clipped to [0, T-1] in int64 and picks its row with one exact Gather. The
clamp is deliberate: TensorRT returns zeros, without an error, for an out-of-range Gather index.
A NaN floating-point timestep gives a NaN output.

This module needs onnx only, never torch.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibexport.errors import CalibexportError

logger = logging.getLogger(__name__)

#: Prefix of every node, initializer and value name that the fold adds.
PREFIX = "calibexport_eta/"
#: A protobuf message cannot reach 2 GiB, so larger models keep their weights in a separate file
#: and onnx.checker cannot take them in memory.
PROTOBUF_LIMIT_BYTES = 2**31
# The fold uses Clip with min/max inputs on int64 (opset 12) and Gather/Reshape semantics of 13.
_MIN_OPSET = 13
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_INT_TYPES = (TensorProto.INT32, TensorProto.INT64)


def fold_eta(
    model: onnx.ModelProto,
    eta: np.ndarray,
    *,
    timestep_input: str = "t",
    output: str | None = None,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Return a copy of ``model`` whose ``output`` is ``eps - eta(timestep_input)``.

    ``eta`` is the float32 table [T, C, H, W] (float64 is cast), row k for model input time k.
    ``output`` None selects the graph's only output. The output keeps its name and dtype, and the
    timestep input keeps its dtype. ``metadata`` entries are added to ``metadata_props``,
    replacing entries with the same key. The result passes ``onnx.checker`` and strict shape
    inference. Raises CalibexportError when the table does not fit the graph.
    """
    table = _check_table(eta)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph

    opset = default_opset(folded)
    if opset < _MIN_OPSET:
        raise CalibexportError(
            f"the graph uses ONNX opset {opset}; folding eta needs opset {_MIN_OPSET} or newer. "
            "Re-export the network with a newer opset."
        )
    timestep = _find_input(graph, timestep_input)
    eps = _find_output(graph, output)
    _check_table_fits(table, eps)
    if any(name.startswith(PREFIX) for name in _all_names(graph)):
        raise CalibexportError(
            f"the graph already contains names starting with {PREFIX!r}: eta is folded in already. "
            "Fold into the uncalibrated network export instead."
        )

    # The network's own output becomes an internal value; the graph output is rebuilt on top.
    raw_name = PREFIX + "uncalibrated_" + eps.name
    _rename_value(graph, eps.name, raw_name)
    graph.initializer.append(numpy_helper.from_array(table, PREFIX + "table"))

    t_type = timestep.type.tensor_type.elem_type
    if t_type in _INT_TYPES:
        eta_name = _gather_exact(graph, timestep.name, t_type, len(table))
    elif t_type in _FLOAT_TYPES:
        eta_name = _gather_interpolated(graph, timestep.name, t_type, len(table))
    else:
        raise CalibexportError(
            f"timestep input {timestep.name!r} has ONNX type {TensorProto.DataType.Name(t_type)}; "
            "supported: float16, bfloat16, float32, float64, int32, int64."
        )
    _subtract(graph, raw_name, eta_name, eps.name, eps.type.tensor_type.elem_type)

    _set_metadata(folded, metadata or {})
    check_folded_model(folded, eps.name)
    logger.info("Folded eta [%s] into output %r (timestep input %r, %s).",
                ", ".join(map(str, table.shape)), eps.name, timestep.name,
                "exact row lookup" if t_type in _INT_TYPES else "linear interpolation")
    return folded


def check_folded_model(model: onnx.ModelProto, output: str) -> None:
    """Run onnx.checker and strict shape inference, and check the output keeps its static dims."""
    if model.ByteSize() >= PROTOBUF_LIMIT_BYTES:
        # NOTE: models past the protobuf limit skip both checks; they need a path-based check.
        logger.warning("model is %d bytes, past the 2 GiB protobuf limit: checks skipped.",
                       model.ByteSize())
        return
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                     data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CalibexportError(f"the folded ONNX graph is invalid: {exc}") from exc
    declared = _find_output(model.graph, output).type.tensor_type.shape
    seen = _find_output(inferred.graph, output).type.tensor_type.shape
    if _dims(seen)[1:] != _dims(declared)[1:]:
        raise CalibexportError(
            f"shape inference gives output {output!r} the shape {_dims(seen)}, but the graph "
            f"declares {_dims(declared)}."
        )


def save_onnx(
    model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None
) -> None:
    """Write ``model`` to ``path`` through a temporary file in the same folder and os.replace.

    ``external_data`` None stores the weights inside the file unless the model reaches the 2 GiB
    protobuf limit; True stores them in ``<name>.data`` beside it, replaced before the model file.
    """
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() >= PROTOBUF_LIMIT_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp-", dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        data_name = path.name + ".data"
        try:
            onnx.save_model(model, str(tmp_model), save_as_external_data=external_data,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=1024)
        except (OSError, ValueError) as exc:
            raise CalibexportError(f"failed to write ONNX model {path}: {exc}") from exc
        if external_data:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    logger.info("Wrote %s (%.1f MB%s).", path, path.stat().st_size / 1e6,
                ", weights in " + path.name + ".data" if external_data else "")


def _check_table(eta: Any) -> np.ndarray:
    table = np.asarray(eta)
    if table.ndim != 4:
        raise CalibexportError(
            f"eta must be a 4-D array [T, C, H, W], got shape {list(table.shape)}."
        )
    if table.shape[0] < 1:
        raise CalibexportError("eta has no rows (T = 0); estimate the table first.")
    if not np.issubdtype(table.dtype, np.floating):
        raise CalibexportError(f"eta must be a floating-point array, got dtype {table.dtype}.")
    if not np.all(np.isfinite(table)):
        rows = np.unique(np.nonzero(~np.isfinite(table))[0])
        raise CalibexportError(
            f"eta contains NaN or Inf in rows {rows[:8].tolist()}; re-estimate those timesteps."
        )
    return np.ascontiguousarray(table, dtype=np.float32)


def _check_table_fits(table: np.ndarray, eps: onnx.ValueInfoProto) -> None:
    dims = _dims(eps.type.tensor_type.shape)
    if len(dims) != 4:
        raise CalibexportError(
            f"output {eps.name!r} has shape {dims}; folding eta needs a 4-D output [B, C, H, W]."
        )
    mismatches = []
    for axis, name in enumerate("CHW", start=1):
        graph_size = dims[axis]
        if not isinstance(graph_size, int):
            raise CalibexportError(
                f"output {eps.name!r} has shape {dims}: {name} is not static, so the table "
                "cannot be checked against it. Export with static C, H and W."
            )
        if graph_size != table.shape[axis]:
            mismatches.append(f"{name}: eta has {table.shape[axis]}, the graph has {graph_size}")
    if mismatches:
        raise CalibexportError(
            f"eta [{', '.join(map(str, table.shape))}] does not fit output {eps.name!r} "
            f"{dims} ({'; '.join(mismatches)}); use the table estimated for this model."
        )


def _gather_exact(graph: onnx.GraphProto, timestep: str, t_type: int, num_rows: int) -> str:
    """Add eta = table[clip(t, 0, T-1)] for an integer timestep; return the eta value name."""
    index = timestep
    if t_type != TensorProto.INT64:
        index = _node(graph, "Cast", [timestep], "t_int64", to=TensorProto.INT64)
    low = _constant(graph, "index_min", np.array(0, dtype=np.int64))
    high = _constant(graph, "index_max", np.array(num_rows - 1, dtype=np.int64))
    index = _node(graph, "Clip", [index, low, high], "index")
    return _node(graph, "Gather", [PREFIX + "table", index], "eta", axis=0)


def _gather_interpolated(graph: onnx.GraphProto, timestep: str, t_type: int, num_rows: int) -> str:
    """Add the interpolated lookup for a floating-point timestep; return the eta value name."""
    t = timestep
    if t_type != TensorProto.FLOAT:
        # NOTE: float64 times lose precision here (w is off by up to 2^-24 * t for t in [0, T-1]).
        t = _node(graph, "Cast", [timestep], "t_float32", to=TensorProto.FLOAT)

    # t' = clip(t, 0, T-1); lo = floor(t'); w = t' - lo
    t_min = _constant(graph, "t_min", np.array(0.0, dtype=np.float32))
    t_max = _constant(graph, "t_max", np.array(num_rows - 1, dtype=np.float32))
    clamped = _node(graph, "Clip", [t, t_min, t_max], "t_clamped")
    floor = _node(graph, "Floor", [clamped], "t_floor")
    weight = _node(graph, "Sub", [clamped, floor], "weight")
    weight_shape = _constant(graph, "weight_shape", np.array([-1, 1, 1, 1], dtype=np.int64))
    weight = _node(graph, "Reshape", [weight, weight_shape], "weight_bchw")

    # lo and hi = min(lo + 1, T-1) as int64 row indices. A NaN time passes Clip as NaN, so it
    # reads row 0 and keeps w = NaN: eta and the output become NaN instead of an invalid index.
    is_nan = _node(graph, "IsNaN", [floor], "t_is_nan")
    floor = _node(graph, "Where", [is_nan, t_min, floor], "t_floor_finite")
    lower = _node(graph, "Cast", [floor], "index_lower", to=TensorProto.INT64)
    one = _constant(graph, "index_one", np.array(1, dtype=np.int64))
    last = _constant(graph, "index_last", np.array(num_rows - 1, dtype=np.int64))
    upper = _node(graph, "Add", [lower, one], "index_next")
    upper = _node(graph, "Min", [upper, last], "index_upper")

    # eta = table[lo] + w * (table[hi] - table[lo])
    row_lower = _node(graph, "Gather", [PREFIX + "table", lower], "row_lower", axis=0)
    row_upper = _node(graph, "Gather", [PREFIX + "table", upper], "row_upper", axis=0)
    delta = _node(graph, "Sub", [row_upper, row_lower], "row_delta")
    step = _node(graph, "Mul", [weight, delta], "row_step")
    return _node(graph, "Add", [row_lower, step], "eta")


def _subtract(graph: onnx.GraphProto, raw: str, eta: str, out: str, out_type: int) -> None:
    """Add ``out = raw - eta``; float16/bfloat16 outputs subtract in float32, float64 in float64."""
    if out_type == TensorProto.FLOAT:
        graph.node.append(helper.make_node("Sub", [raw, eta], [out], name=PREFIX + "subtract"))
    elif out_type == TensorProto.DOUBLE:
        eta = _node(graph, "Cast", [eta], "eta_float64", to=TensorProto.DOUBLE)
        graph.node.append(helper.make_node("Sub", [raw, eta], [out], name=PREFIX + "subtract"))
    elif out_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raw32 = _node(graph, "Cast", [raw], "eps_float32", to=TensorProto.FLOAT)
        calibrated = _node(graph, "Sub", [raw32, eta], "eps_calibrated_float32")
        graph.node.append(helper.make_node("Cast", [calibrated], [out], name=PREFIX + "cast_out",
                                           to=out_type))
    else:
        raise CalibexportError(
            f"output {out!r} has ONNX type {TensorProto.DataType.Name(out_type)}; folding eta "
            "needs a float16, bfloat16, float32 or float64 output."
        )


def _node(graph: onnx.GraphProto, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
    """Append one node whose single output is PREFIX + name; return that output name."""
    output = PREFIX + name
    graph.node.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
    return output


def _constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, PREFIX + name))
    return PREFIX + name


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the value ``old`` at its producer and at every consumer in the main graph."""
    producers = [node for node in graph.node if old in node.output]
    if not producers:
        raise CalibexportError(
            f"output {old!r} is not produced by a node (it is a graph input or an initializer); "
            "there is no network to fold eta into."
        )
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new
        if any(attr.HasField("g") or attr.graphs for attr in node.attribute):
            # NOTE: a subgraph that reads the output by its outer name is not rewired.
            logger.warning("node %r has a subgraph; references to %r inside it are not renamed.",
                           node.name, old)
    for info in graph.value_info:
        if info.name == old:
            info.name = new


def _set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CalibexportError(
                f"metadata entries must be str -> str, got {key!r}: {type(value).__name__}; "
                "serialise structured values (for example with json.dumps) first."
            )
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    helper.set_model_props(model, {**dict(kept), **metadata})


def _find_input(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    for value in graph.input:
        if value.name == name:
            return value
    raise CalibexportError(
        f"timestep input {name!r} not found; the graph inputs are "
        f"{[v.name for v in graph.input]}. Pass the right timestep_input."
    )


def _find_output(graph: onnx.GraphProto, name: str | None) -> onnx.ValueInfoProto:
    outputs = list(graph.output)
    if name is None:
        if len(outputs) != 1:
            raise CalibexportError(
                f"the graph has {len(outputs)} outputs {[o.name for o in outputs]}; pass output= "
                "to choose the noise prediction."
            )
        return outputs[0]
    for value in outputs:
        if value.name == name:
            return value
    raise CalibexportError(
        f"output {name!r} not found; the graph outputs are {[o.name for o in outputs]}."
    )


def _dims(shape: onnx.TensorShapeProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def default_opset(model: onnx.ModelProto) -> int:
    """Return the version of the default ONNX operator set that ``model`` imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise CalibexportError("the model imports no default-domain ONNX opset.")


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in (*graph.input, *graph.output, *graph.initializer)}
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names
