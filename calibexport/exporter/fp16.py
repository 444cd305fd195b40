"""fp16 builds: convert an exported float32 network to float16, keeping float32 islands.

``convert_to_fp16`` rewrites the ONNX graph. Every node that computes with floating-point values
derived from the image input runs in float16, except these float32 islands:

* the timestep branch: every node whose values do not depend on the image, which is the
  sinusoidal embedding, its MLP and the per-block projections. The angles t * f reach sin and
  cos in float32, where float16 would round them at t = 937 to steps of 0.5 (up to 0.25 rad);
* normalization (GroupNormalization, InstanceNormalization, LayerNormalization,
  BatchNormalization), whose statistics square activations that can pass 255, where the
  square overflows float16's maximum of 65504;
* attention: each Softmax together with the MatMul that produces its logits and the scaling
  or masking ops in between, because q.k can overflow float16 before it is scaled.

The graph interface does not change: ``x`` and the output stay float32, so the eta fold that
follows subtracts in float32 and the runtime feeds the same inputs. Casts are inserted where
float16 and float32 values meet; float32 initializers read by float16 nodes are stored as
float16. ``calibexport.exporter.fp16_scan`` then checks the built model at every timestep.
This module needs onnx only, never torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibexport.errors import CalibexportError
from calibexport.exporter.fold import find_timestep_input
from calibexport.exporter.onnx_utils import check_and_annotate

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
#: The largest finite float16 value.
FLOAT16_MAX = 65504.0
NORMALIZATION_OPS = frozenset({"GroupNormalization", "InstanceNormalization",
                               "LayerNormalization", "BatchNormalization"})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
# Ops between the logits MatMul and the Softmax that scale, mask or reshape the logits.
_LOGIT_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Reshape", "Transpose", "Cast"})
_LOGIT_SOURCES = frozenset({"MatMul", "Gemm", "Einsum"})
# Ops whose outputs depend only on the shape of their inputs, never on the values.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
# Inputs that keep their own float type whatever the node computes in: Resize's roi and scales.
_FIXED_FLOAT_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
_SUFFIX = "/fp16"


@dataclass
class Fp16Report:
    """The float32 islands of a conversion, its float16 node count and the float16 values."""

    fp16_nodes: int = 0
    islands: dict[str, list[str]] = field(default_factory=dict)
    casts: int = 0
    #: Names (in the float32 graph) of the non-constant values the float16 nodes read or write.
    fp16_values: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"fp16_nodes": self.fp16_nodes, "casts": self.casts,
                "fp32_islands": {name: len(nodes) for name, nodes in self.islands.items()}}


def convert_to_fp16(model: onnx.ModelProto, *, islands: bool = True,
                    report: Fp16Report | None = None) -> onnx.ModelProto:
    """Return a float16 copy of ``model`` with the float32 islands of the module docstring.

    ``islands`` False converts every node that computes with float values, the timestep branch
    included, which is only useful to show what the islands prevent. ``report``, if given, is
    filled with the island membership. Raises CalibexportError for graphs with control flow
    (If, Loop, Scan), which are not converted.
    """
    start = time.perf_counter()
    source = onnx.inliner.inline_local_functions(model) if model.functions else model
    inferred = onnx.shape_inference.infer_shapes(source, data_prop=True)
    graph = inferred.graph
    _reject_subgraphs(graph)
    types = _value_types(inferred)
    timestep = find_timestep_input(graph).name
    image_inputs = [v.name for v in graph.input if v.name != timestep]
    dependent = _image_dependent(graph, image_inputs)

    chosen = _choose_precisions(graph, types, dependent, islands)
    report = report if report is not None else Fp16Report()
    converted = _rewrite(inferred, types, chosen, report)
    logger.info("Converted to fp16: %d nodes in float16, float32 islands %s, %d casts (%.1fs).",
                report.fp16_nodes, {k: len(v) for k, v in report.islands.items()}, report.casts,
                time.perf_counter() - start)
    return converted


def _reject_subgraphs(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        if any(attr.HasField("g") or attr.graphs for attr in node.attribute):
            raise CalibexportError(
                f"node {node.name or node.op_type!r} ({node.op_type}) has a subgraph; fp16 "
                "conversion handles graphs without control flow only. Build with --precision fp32."
            )


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    missing = [out for node in graph.node for out in node.output if out and out not in types]
    if missing:
        raise CalibexportError(
            f"shape inference left the types of {len(missing)} values unknown (first: "
            f"{missing[:3]}); fp16 conversion needs every value's type."
        )
    return types


def _image_dependent(graph: onnx.GraphProto, image_inputs: Iterable[str]) -> set[str]:
    """Return the names of values whose contents depend on the image inputs."""
    reached = set(image_inputs)
    for node in graph.node:
        if node.op_type not in _SHAPE_ONLY_OPS and not reached.isdisjoint(node.input):
            reached.update(node.output)
    return reached


def _choose_precisions(graph: onnx.GraphProto, types: dict[str, int], dependent: set[str],
                       islands: bool) -> dict[int, str]:
    """Return, per node index, "fp16", an island name, or "no_float_values" (left as is)."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    attention = _attention_nodes(graph, producers, dependent) if islands else set()
    chosen = {}
    for i, node in enumerate(graph.node):
        uses_float = any(types.get(name) == TensorProto.FLOAT
                         for name in (*node.input, *node.output) if name)
        if not uses_float or not node.input:
            # Constant nodes stay as they are, so constants read as Resize scales keep float32.
            chosen[i] = "no_float_values"
        elif not islands:
            chosen[i] = "fp16"
        elif not dependent.intersection(node.output):
            chosen[i] = "timestep_branch"
        elif node.op_type in NORMALIZATION_OPS:
            chosen[i] = "normalization"
        elif i in attention:
            chosen[i] = "attention_softmax"
        else:
            chosen[i] = "fp16"
    return chosen


def _attention_nodes(graph: onnx.GraphProto, producers: dict[str, int],
                     dependent: set[str]) -> set[int]:
    """Return the indices of each Softmax, its logits MatMul and the ops between them."""
    members: set[int] = set()
    for i, node in enumerate(graph.node):
        if node.op_type not in SOFTMAX_OPS:
            continue
        members.add(i)
        chain, value = [], node.input[0]
        while value in producers:
            j = producers[value]
            producer = graph.node[j]
            if producer.op_type in _LOGIT_SOURCES:
                members.update(chain + [j])
                break
            if producer.op_type not in _LOGIT_OPS:
                break
            chain.append(j)
            inputs = [name for name in producer.input if name in dependent]
            if not inputs:
                break
            value = inputs[0]
    return members


def _rewrite(model: onnx.ModelProto, types: dict[str, int], chosen: dict[int, str],
             report: Fp16Report) -> onnx.ModelProto:
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    fp16_readers, fp32_readers = set(), {v.name for v in graph.output}
    for i, node in enumerate(graph.node):
        fixed = _FIXED_FLOAT_INPUTS.get(node.op_type, set())
        for k, name in enumerate(node.input):
            half = chosen[i] == "fp16" and k not in fixed and node.op_type not in _SHAPE_ONLY_OPS
            (fp16_readers if half else fp32_readers).add(name)

    # Float32 initializers read in float16 get a float16 twin (or are converted in place).
    twins: dict[str, str] = {}
    new_initializers = []
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and tensor.name in fp16_readers:
            name = tensor.name if tensor.name not in fp32_readers else tensor.name + _SUFFIX
            values = numpy_helper.to_array(tensor)
            if values.size and np.abs(values).max() > FLOAT16_MAX:
                raise CalibexportError(
                    f"initializer {tensor.name!r} contains {np.abs(values).max():.4g}, beyond "
                    f"float16's maximum {FLOAT16_MAX:g}; build this network with --precision fp32."
                )
            half = values.astype(np.float16)
            new_initializers.append(numpy_helper.from_array(half, name))
            twins[tensor.name] = name
            if tensor.name in fp32_readers:
                new_initializers.append(tensor)
        else:
            new_initializers.append(tensor)

    current = dict(types)  # the float type each value has after the rewrite
    for name, twin in twins.items():
        current[twin] = TensorProto.FLOAT16
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []
    checked: dict[str, None] = {}  # insertion-ordered set of float16 value names
    for i, node in enumerate(graph.node):
        precision = chosen[i]
        if precision == "fp16":
            report.fp16_nodes += 1
        elif precision != "no_float_values":
            report.islands.setdefault(precision, []).append(node.name or node.op_type)
        target = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        fixed = _FIXED_FLOAT_INPUTS.get(node.op_type, set())
        for k, name in enumerate(node.input):
            if not name or k in fixed or types.get(name) != TensorProto.FLOAT:
                continue
            if node.op_type in _SHAPE_ONLY_OPS:
                continue
            if target == TensorProto.FLOAT16 and name not in initializers:
                checked[name] = None
            if target == TensorProto.FLOAT16 and name in twins:
                node.input[k] = twins[name]
            elif current[name] != target:
                node.input[k] = _cast(nodes, casts, name, target, report)
        if precision == "fp16":
            _set_float16_attributes(node)
            for name in node.output:
                if types.get(name) == TensorProto.FLOAT:
                    current[name] = TensorProto.FLOAT16
                    checked[name] = None
        nodes.append(node)

    # Graph outputs keep float32: cast a float16 result back under the output's own name.
    for output in graph.output:
        if current.get(output.name) == TensorProto.FLOAT16:
            half_name = output.name + _SUFFIX
            for node in nodes:
                node.output[:] = [half_name if n == output.name else n for n in node.output]
                node.input[:] = [half_name if n == output.name else n for n in node.input]
            nodes.append(helper.make_node("Cast", [half_name], [output.name],
                                          name=output.name + "/cast_float32",
                                          to=TensorProto.FLOAT))
            report.casts += 1

    report.fp16_values = list(checked)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_initializers)
    # The float32 value_info of the source graph no longer holds; inference writes new entries.
    del graph.value_info[:]
    return check_and_annotate(model, what="fp16 ONNX graph")


def _set_float16_attributes(node: onnx.NodeProto) -> None:
    """Make the float32 results that a node's attributes define (Cast targets, constants) fp16."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif (node.op_type == "ConstantOfShape" and attr.name == "value"
              and attr.t.data_type == TensorProto.FLOAT):
            half = numpy_helper.to_array(attr.t).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(half, attr.t.name))


def _cast(nodes: list[onnx.NodeProto], casts: dict[tuple[str, int], str], name: str,
          target: int, report: Fp16Report) -> str:
    """Return the name of ``name`` cast to ``target``, adding the Cast node once."""
    key = (name, target)
    if key not in casts:
        suffix = "float16" if target == TensorProto.FLOAT16 else "float32"
        cast_name = f"{name}/cast_{suffix}"
        nodes.append(helper.make_node("Cast", [name], [cast_name], name=cast_name, to=target))
        casts[key] = cast_name
        report.casts += 1
    return casts[key]
