"""Fold the calibration offset into an ONNX graph, in the network's own parameterization.

The eta table is stored as a float32 initializer [T, C, H, W], row k for model input time k. For
a floating-point timestep input the graph computes, per sample,

    t' = clip(t, 0, T-1);  lo = floor(t');  hi = min(lo + 1, T-1);  w = t' - lo
    eta(t) = table[lo] + w * (table[hi] - table[lo])

which is the rule of ``calibexport.runtime.eta_table.EtaTable.at``: the weight is computed in the
timestep's precision (float32, or float64 for a float64 input) and the blend in float32. An
integer timestep input (int32 or int64) is clipped to [0, T-1] in int64 and picks its row with one
exact Gather. The clamp is deliberate: TensorRT returns zeros, without an error, for an
out-of-range Gather index. A NaN floating-point timestep gives a NaN output.

The table is in eps units. The output is corrected in the network's own units so that its
implied eps is ``eps - eta`` (``calibexport.runtime.prediction.calibrate_output``):

    eps: out - eta;   x0: out + (sigma_t / alpha_t) eta;   v: out - eta / alpha_t

For x0 and v the graph also stores log_alpha per table row [T, 1, 1, 1] and reads it with the
same lookup as eta, which for a discrete schedule is the schedule's own interpolation. Then
``sigma_t / alpha_t = sqrt(exp(-2 log_alpha) - 1)`` and ``1 / alpha_t = exp(-log_alpha)``.

This module needs onnx only, never torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibexport.errors import CalibexportError
from calibexport.exporter.onnx_utils import (  # noqa: F401  (re-exported for existing callers)
    PROTOBUF_LIMIT_BYTES,
    check_model,
    default_opset,
    dims,
    save_onnx,
)
from calibexport.runtime.prediction import PREDICTION_TYPES, check_prediction_type

logger = logging.getLogger(__name__)

#: Prefix of every node, initializer and value name that the fold adds.
PREFIX = "calibexport_eta/"
# The fold uses Clip with min/max inputs on int64 (opset 12) and Gather/Reshape semantics of 13.
_MIN_OPSET = 13
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_INT_TYPES = (TensorProto.INT32, TensorProto.INT64)
_TIMESTEP_TYPES = _FLOAT_TYPES + _INT_TYPES


def fold_eta(
    model: onnx.ModelProto,
    eta: np.ndarray,
    *,
    timestep_input: str | None = None,
    output: str | None = None,
    prediction_type: str = "eps",
    log_alpha: np.ndarray | None = None,
    metadata: dict[str, str] | None = None,
    copy: bool = True,
) -> onnx.ModelProto:
    """Return a copy of ``model`` whose ``output`` is calibrated by the eps-unit table ``eta``.

    ``eta`` is the float32 table [T, C, H, W] (float64 is cast), row k for model input time k.
    ``timestep_input`` None selects the only graph input of rank 0 or 1 with an integer or
    floating-point type (``find_timestep_input``). ``output`` None selects the graph's only
    output. ``prediction_type`` is what the output predicts (eps, x0 or v); x0 and v need
    ``log_alpha``, the schedule's log alpha at the T table rows
    (``calibexport.runtime.prediction.table_log_alpha``). The output keeps its name and dtype,
    and the timestep input keeps its dtype. ``metadata`` entries are added to
    ``metadata_props``, replacing entries with the same key. The result passes onnx.checker and
    strict shape inference. Raises CalibexportError when the table does not fit the graph.

    ``copy=False`` folds into ``model`` itself and returns it, which saves a copy of the weights.
    The input checks run before the graph changes. If the final check of the folded graph fails,
    ``model`` is left changed.
    """
    table = _check_table(eta)
    coefficient_table = _check_log_alpha(prediction_type, log_alpha, len(table))
    if copy:
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    else:
        folded = model
    graph = folded.graph

    opset = default_opset(folded)
    if opset < _MIN_OPSET:
        raise CalibexportError(
            f"the graph uses ONNX opset {opset}; folding eta needs opset {_MIN_OPSET} or newer. "
            "Re-export the network with a newer opset."
        )
    timestep = find_timestep_input(graph, timestep_input)
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
        lookup = _exact_lookup(graph, timestep.name, t_type, len(table))
    else:
        lookup = _interpolated_lookup(graph, timestep.name, t_type, len(table))
    correction = lookup.read(graph, PREFIX + "table", "eta")
    if coefficient_table is not None:
        coefficients = numpy_helper.from_array(coefficient_table, PREFIX + "log_alpha_table")
        graph.initializer.append(coefficients)
        log_alpha_t = lookup.read(graph, PREFIX + "log_alpha_table", "log_alpha")
        correction = _scaled_correction(graph, prediction_type, log_alpha_t, correction)
    operation = "Add" if prediction_type == "x0" else "Sub"
    _combine(graph, operation, raw_name, correction, eps.name, eps.type.tensor_type.elem_type)

    _set_metadata(folded, metadata or {})
    check_folded_model(folded, eps.name)
    logger.info("Folded eta [%s] into %s output %r (timestep input %r, %s).",
                ", ".join(map(str, table.shape)), prediction_type, eps.name, timestep.name,
                "exact row lookup" if t_type in _INT_TYPES else "linear interpolation")
    return folded


def find_timestep_input(graph: onnx.GraphProto, name: str | None = None) -> onnx.ValueInfoProto:
    """Return the graph input ``name``, or without a name the only plausible timestep input.

    A plausible timestep input has rank 0 or 1 and an integer or floating-point type, and is not
    an initializer. Raises CalibexportError when none or several inputs qualify.
    """
    inputs = _real_inputs(graph)
    if name is not None:
        for value in inputs:
            if value.name == name:
                return value
        raise CalibexportError(
            f"timestep input {name!r} not found; the graph inputs are "
            f"{_describe_inputs(inputs)}. Pass the right timestep input name."
        )
    candidates = [
        value for value in inputs
        if value.type.tensor_type.elem_type in _TIMESTEP_TYPES
        and value.type.tensor_type.HasField("shape")
        and len(value.type.tensor_type.shape.dim) <= 1
    ]
    if len(candidates) == 1:
        return candidates[0]
    reason = "none has" if not candidates else f"{len(candidates)} have"
    raise CalibexportError(
        f"cannot tell the timestep input: of the graph inputs {_describe_inputs(inputs)}, "
        f"{reason} rank 0 or 1 and an integer or float type. Name it with --timestep-input "
        "(timestep_input=)."
    )


def check_folded_model(model: onnx.ModelProto, output: str) -> None:
    """Run onnx.checker and strict shape inference, and check the output keeps its static dims."""
    inferred = check_model(model, what="folded ONNX graph")
    declared = _find_output(model.graph, output).type.tensor_type.shape
    seen = _find_output(inferred.graph, output).type.tensor_type.shape
    if dims(seen)[1:] != dims(declared)[1:]:
        raise CalibexportError(
            f"shape inference gives output {output!r} the shape {dims(seen)}, but the graph "
            f"declares {dims(declared)}."
        )


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


def _check_log_alpha(prediction_type: str, log_alpha: Any, num_rows: int) -> np.ndarray | None:
    """Return log_alpha as float32 [T, 1, 1, 1] for x0 and v, None for eps."""
    if check_prediction_type(prediction_type) == "eps":
        return None
    if log_alpha is None:
        raise CalibexportError(
            f"folding eta into a {prediction_type} network needs the schedule's log_alpha at the "
            "table rows; pass log_alpha (calibexport.runtime.prediction.table_log_alpha)."
        )
    values = np.asarray(log_alpha, dtype=np.float64).reshape(-1)
    if len(values) != num_rows:
        raise CalibexportError(
            f"log_alpha has {len(values)} entries but eta has {num_rows} rows; compute it for "
            "the same table rows."
        )
    if not np.all(np.isfinite(values)) or np.any(values >= 0):
        raise CalibexportError(
            "log_alpha must be finite and negative at every row (0 < alpha_t < 1), got values "
            f"in [{values.min():g}, {values.max():g}]; check the schedule."
        )
    return values.astype(np.float32).reshape(num_rows, 1, 1, 1)


def _check_table_fits(table: np.ndarray, eps: onnx.ValueInfoProto) -> None:
    shape = dims(eps.type.tensor_type.shape)
    if len(shape) != 4:
        raise CalibexportError(
            f"output {eps.name!r} has shape {shape}; folding eta needs a 4-D output [B, C, H, W]."
        )
    mismatches = []
    for axis, name in enumerate("CHW", start=1):
        graph_size = shape[axis]
        if not isinstance(graph_size, int):
            raise CalibexportError(
                f"output {eps.name!r} has shape {shape}: {name} is not static, so the table "
                "cannot be checked against it. Export with static C, H and W."
            )
        if graph_size != table.shape[axis]:
            mismatches.append(f"{name}: eta has {table.shape[axis]}, the graph has {graph_size}")
    if mismatches:
        raise CalibexportError(
            f"eta [{', '.join(map(str, table.shape))}] does not fit output {eps.name!r} "
            f"{shape} ({'; '.join(mismatches)}); use the table estimated for this model."
        )


@dataclass(frozen=True)
class _Lookup:
    """Row indices and weight of one timestep lookup, shared by every table read with it."""

    lower: str
    upper: str | None = None
    weight: str | None = None

    def read(self, graph: onnx.GraphProto, table: str, name: str) -> str:
        """Add the nodes that read ``table`` at the looked-up rows; return the value name."""
        row_lower = _node(graph, "Gather", [table, self.lower], f"{name}_lower", axis=0)
        if self.upper is None:
            return row_lower

        # table[lo] + w * (table[hi] - table[lo])
        row_upper = _node(graph, "Gather", [table, self.upper], f"{name}_upper", axis=0)
        delta = _node(graph, "Sub", [row_upper, row_lower], f"{name}_delta")
        step = _node(graph, "Mul", [self.weight, delta], f"{name}_step")
        return _node(graph, "Add", [row_lower, step], name)


def _exact_lookup(graph: onnx.GraphProto, timestep: str, t_type: int, num_rows: int) -> _Lookup:
    """Add index = clip(t, 0, T-1) in int64 for an integer timestep."""
    index = timestep
    if t_type != TensorProto.INT64:
        index = _node(graph, "Cast", [timestep], "t_int64", to=TensorProto.INT64)
    low = _constant(graph, "index_min", np.array(0, dtype=np.int64))
    high = _constant(graph, "index_max", np.array(num_rows - 1, dtype=np.int64))
    return _Lookup(_node(graph, "Clip", [index, low, high], "index"))


def _interpolated_lookup(graph: onnx.GraphProto, timestep: str, t_type: int,
                         num_rows: int) -> _Lookup:
    """Add the rows lo, hi and the weight w of the interpolated lookup for a float timestep."""
    if t_type not in _FLOAT_TYPES:
        raise CalibexportError(
            f"timestep input {timestep!r} has ONNX type {TensorProto.DataType.Name(t_type)}; "
            "supported: float16, bfloat16, float32, float64, int32, int64."
        )
    # float16 and bfloat16 widen to float32 exactly; float64 keeps its precision for w.
    work_type = TensorProto.DOUBLE if t_type == TensorProto.DOUBLE else TensorProto.FLOAT
    work_dtype = np.float64 if work_type == TensorProto.DOUBLE else np.float32
    t = timestep
    if t_type != work_type:
        t = _node(graph, "Cast", [timestep], "t_float32", to=work_type)

    # t' = clip(t, 0, T-1); lo = floor(t'); w = t' - lo, then w in float32 shaped [B, 1, 1, 1]
    t_min = _constant(graph, "t_min", np.array(0.0, dtype=work_dtype))
    t_max = _constant(graph, "t_max", np.array(num_rows - 1, dtype=work_dtype))
    clamped = _node(graph, "Clip", [t, t_min, t_max], "t_clamped")
    floor = _node(graph, "Floor", [clamped], "t_floor")
    weight = _node(graph, "Sub", [clamped, floor], "weight")
    if work_type != TensorProto.FLOAT:
        weight = _node(graph, "Cast", [weight], "weight_float32", to=TensorProto.FLOAT)
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
    return _Lookup(lower, upper, weight)


def _scaled_correction(graph: onnx.GraphProto, prediction_type: str, log_alpha: str,
                       eta: str) -> str:
    """Add the x0 term (sigma/alpha) eta or the v term eta/alpha; return its value name."""
    if prediction_type == "x0":
        # sigma/alpha = sqrt(1/alpha^2 - 1); Relu guards the root against rounding below zero.
        minus_two = _constant(graph, "minus_two", np.array(-2.0, dtype=np.float32))
        one = _constant(graph, "one", np.array(1.0, dtype=np.float32))
        exponent = _node(graph, "Mul", [log_alpha, minus_two], "minus_two_log_alpha")
        inverse_square = _node(graph, "Exp", [exponent], "inverse_alpha_squared")
        ratio_square = _node(graph, "Sub", [inverse_square, one], "sigma_over_alpha_squared")
        ratio_square = _node(graph, "Relu", [ratio_square], "sigma_over_alpha_squared_clamped")
        coefficient = _node(graph, "Sqrt", [ratio_square], "sigma_over_alpha")
    else:
        negated = _node(graph, "Neg", [log_alpha], "minus_log_alpha")
        coefficient = _node(graph, "Exp", [negated], "inverse_alpha")
    return _node(graph, "Mul", [coefficient, eta], f"{prediction_type}_correction")


def _combine(graph: onnx.GraphProto, operation: str, raw: str, correction: str, out: str,
             out_type: int) -> None:
    """Add ``out = raw (+|-) correction``; float16/bfloat16 in float32, float64 in float64."""
    name = PREFIX + ("subtract" if operation == "Sub" else "add")
    if out_type == TensorProto.FLOAT:
        graph.node.append(helper.make_node(operation, [raw, correction], [out], name=name))
    elif out_type == TensorProto.DOUBLE:
        correction = _node(graph, "Cast", [correction], "correction_float64", to=TensorProto.DOUBLE)
        graph.node.append(helper.make_node(operation, [raw, correction], [out], name=name))
    elif out_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raw32 = _node(graph, "Cast", [raw], "output_float32", to=TensorProto.FLOAT)
        calibrated = _node(graph, operation, [raw32, correction], "calibrated_float32")
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
    """Rename the value ``old`` at its producer and at every consumer, subgraphs included."""
    producers = [node for node in graph.node if old in node.output]
    if not producers:
        raise CalibexportError(
            f"output {old!r} is not produced by a node (it is a graph input or an initializer); "
            "there is no network to fold eta into."
        )
    _rename_references(graph, old, new)
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for info in graph.value_info:
        if info.name == old:
            info.name = new


def _rename_references(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename node inputs ``old`` in ``graph`` and in subgraphs that do not define ``old``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attribute in node.attribute:
            subgraphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
            for subgraph in subgraphs:
                if old not in _defined_names(subgraph):
                    _rename_references(subgraph, old, new)


def _defined_names(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in (*graph.input, *graph.initializer)}
    for node in graph.node:
        names.update(node.output)
    return names


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


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Return the graph inputs that are not initializers (IR < 4 lists those as inputs too)."""
    initializers = {tensor.name for tensor in graph.initializer}
    return [value for value in graph.input if value.name not in initializers]


def _describe_inputs(inputs: list[onnx.ValueInfoProto]) -> str:
    described = []
    for value in inputs:
        tensor_type = value.type.tensor_type
        type_name = TensorProto.DataType.Name(tensor_type.elem_type).lower()
        shape = dims(tensor_type.shape) if tensor_type.HasField("shape") else "unknown shape"
        described.append(f"{value.name} ({type_name} {shape})")
    return "[" + ", ".join(described) + "]"


def _find_output(graph: onnx.GraphProto, name: str | None) -> onnx.ValueInfoProto:
    outputs = list(graph.output)
    if name is None:
        if len(outputs) != 1:
            raise CalibexportError(
                f"the graph has {len(outputs)} outputs {[o.name for o in outputs]}; pass output= "
                "(--output) to choose the noise prediction."
            )
        return outputs[0]
    for value in outputs:
        if value.name == name:
            return value
    raise CalibexportError(
        f"output {name!r} not found; the graph outputs are {[o.name for o in outputs]}."
    )


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in (*graph.input, *graph.output, *graph.initializer)}
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


__all__ = [
    "PREDICTION_TYPES",
    "PREFIX",
    "PROTOBUF_LIMIT_BYTES",
    "check_folded_model",
    "default_opset",
    "find_timestep_input",
    "fold_eta",
    "save_onnx",
]
