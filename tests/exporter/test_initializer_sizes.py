"""Initializers whose stored data does not match their dims are rejected before saving."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibexport.errors import CalibexportError
from calibexport.exporter.fold import fold_eta

ETA = np.zeros((10, 1, 16, 16), np.float32)


def _network(weight: TensorProto):
    """eps = x * w + t, with w [1, 1, 16, 16] (1 KiB of float32, so above the inline size)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, 16, 16])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"])
    eps = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", 1, 16, 16])
    shape = numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["t", "shape"], ["t4"]),
             helper.make_node("Mul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "t4"], ["eps"])]
    graph = helper.make_graph(nodes, "g", [x, t], [eps], [weight, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _weight(values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(values.astype(np.float32), "w")


def test_matching_initializer_folds():
    folded = fold_eta(_network(_weight(np.ones((1, 1, 16, 16)))), ETA)
    assert folded.graph.output[0].name == "eps"


@pytest.mark.parametrize("size", [512, 1028, 2048])
def test_raw_data_of_wrong_length_rejected(size):
    weight = _weight(np.ones((1, 1, 16, 16)))
    weight.raw_data = (weight.raw_data * 2)[:size]
    with pytest.raises(CalibexportError, match=f"'w' stores {size} bytes, but its dims"):
        fold_eta(_network(weight), ETA)


def test_typed_values_of_wrong_count_rejected():
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 1, 16, 16])
    weight.float_data.extend([1.0] * 100)
    with pytest.raises(CalibexportError, match="stores 100 float_data values, but its dims"):
        fold_eta(_network(weight), ETA)
