"""Fold a compressed eta table (``KnotEta`` or ``LowRankEta``) into an ONNX graph.

``fold_eta`` builds the whole calibration (timestep clamp, interpolation weight, prediction
type, output dtype) around reads ``Gather(table, index)`` of a dense table at int64 row indices.
``fold_compressed_eta`` runs ``fold_eta`` and then replaces each such read with nodes that
compute the same rows from the compressed form, and drops the dense table:

* knots: ``j = segment[index]``, ``w = weight[index]`` (the per-row constants of
  ``KnotEta.row_segments``), then ``rows[j] + w * (rows[j + 1] - rows[j])``;
* lowrank: ``Reshape(MatMul(Gather(U, index), V), [-1, C, H, W])``.

These are the formulas of ``KnotEta.rows_at`` and ``LowRankEta.rows_at``, which
``EtaTable.at`` (the PyTorch reference of ``validate``) uses, so the graph and the reference
agree to float32 rounding. This module needs onnx only, never torch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibexport.errors import CalibexportError
from calibexport.exporter.fold import PREFIX, check_folded_model, fold_eta
from calibexport.runtime.eta_table import EtaTable, KnotEta, LowRankEta

logger = logging.getLogger(__name__)

#: Name of the dense table initializer that ``fold_eta`` reads with Gather.
DENSE_TABLE = PREFIX + "table"
#: Metadata key recording the compressed form folded into the graph.
COMPRESSION_KEY = "calibexport.eta_compression"


def fold_table(model: onnx.ModelProto, table: EtaTable, **options: Any) -> onnx.ModelProto:
    """Fold ``table`` into ``model``: its compressed form if it has one, else its dense rows.

    ``options`` are those of ``fold_eta``.
    """
    if table.compressed is None:
        return fold_eta(model, table.values, **options)
    return fold_compressed_eta(model, table.compressed, **options)


def fold_compressed_eta(
    model: onnx.ModelProto, form: KnotEta | LowRankEta, **options: Any
) -> onnx.ModelProto:
    """Return a copy of ``model`` calibrated by ``form``, storing only the compressed arrays.

    ``options`` are those of ``fold_eta``; the output, its dtype and the checks are the same.
    """
    metadata = {**(options.pop("metadata", None) or {}), COMPRESSION_KEY: form.kind}
    folded = fold_eta(model, form.dense(), metadata=metadata, **options)
    graph = folded.graph
    readers = [node for node in graph.node
               if node.op_type == "Gather" and node.input and node.input[0] == DENSE_TABLE]
    # fold_eta reads the table only with Gather at axis 0; anything else is a change there.
    assert readers, "fold_eta no longer reads its table with Gather"
    assert all(_axis(node) == 0 for node in readers)

    initializers = [item for item in graph.initializer if item.name != DENSE_TABLE]
    del graph.initializer[:]
    graph.initializer.extend(initializers + _compressed_initializers(form))
    nodes = []
    for node in graph.node:
        if node in readers:
            nodes.extend(_row_reader(form, node.input[1], node.output[0]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)

    output = options.get("output") or graph.output[0].name
    check_folded_model(folded, output)
    logger.info("Replaced the dense eta table by its %s form (%d of %d bytes).", form.kind,
                form.nbytes, form.dense().nbytes)
    return folded


def _compressed_initializers(form: KnotEta | LowRankEta) -> list[onnx.TensorProto]:
    if isinstance(form, KnotEta):
        segment, weight = form.row_segments
        arrays = {"knot_rows": form.rows, "row_segment": segment.astype(np.int64),
                  "row_weight": weight, "segment_step": np.array(1, dtype=np.int64),
                  "weight_axes": np.array([1, 2, 3], dtype=np.int64)}
    elif isinstance(form, LowRankEta):
        arrays = {"time_factors": form.time_factors,
                  "pixel_factors": form.pixel_factors.reshape(form.rank, -1),
                  "row_shape": np.array([-1, *form.image_shape], dtype=np.int64)}
    else:
        raise CalibexportError(f"cannot fold an eta table of type {type(form).__name__}.")
    return [numpy_helper.from_array(np.ascontiguousarray(value), PREFIX + name)
            for name, value in arrays.items()]


def _row_reader(form: KnotEta | LowRankEta, index: str, output: str) -> list[onnx.NodeProto]:
    """Return nodes that write the rows at int64 ``index`` [B] to ``output`` [B, C, H, W]."""
    stem = output + "_"

    def node(op_type: str, inputs: list[str], name: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op_type, inputs, [stem + name], name=stem + name, **attrs)

    if isinstance(form, LowRankEta):
        # eta[k] = U[k] @ V, reshaped from [B, C*H*W] to [B, C, H, W].
        nodes = [
            node("Gather", [PREFIX + "time_factors", index], "coefficients", axis=0),
            node("MatMul", [stem + "coefficients", PREFIX + "pixel_factors"], "flat"),
        ]
        nodes.append(helper.make_node("Reshape", [stem + "flat", PREFIX + "row_shape"], [output],
                                      name=stem + "reshape"))
        return nodes

    # eta[k] = rows[j] + w * (rows[j + 1] - rows[j]) with j and w looked up per row k.
    return [
        node("Gather", [PREFIX + "row_segment", index], "segment", axis=0),
        node("Gather", [PREFIX + "row_weight", index], "weight", axis=0),
        node("Unsqueeze", [stem + "weight", PREFIX + "weight_axes"], "weight_bchw"),
        node("Add", [stem + "segment", PREFIX + "segment_step"], "segment_next"),
        node("Gather", [PREFIX + "knot_rows", stem + "segment"], "knot_lower", axis=0),
        node("Gather", [PREFIX + "knot_rows", stem + "segment_next"], "knot_upper", axis=0),
        node("Sub", [stem + "knot_upper", stem + "knot_lower"], "knot_delta"),
        node("Mul", [stem + "weight_bchw", stem + "knot_delta"], "knot_step"),
        helper.make_node("Add", [stem + "knot_lower", stem + "knot_step"], [output],
                         name=stem + "row"),
    ]


def _axis(node: onnx.NodeProto) -> int:
    for attribute in node.attribute:
        if attribute.name == "axis":
            return int(helper.get_attribute_value(attribute))
    return 0
