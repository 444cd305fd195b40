"""save_onnx reports a path it cannot write as a CalibexportError, leaving nothing behind."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from calibexport.errors import CalibexportError
from calibexport.exporter.onnx_utils import save_onnx


def _identity():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_save_writes_loadable_model(tmp_path):
    save_onnx(_identity(), tmp_path / "sub" / "m.onnx")
    assert onnx.load(str(tmp_path / "sub" / "m.onnx")).graph.node[0].op_type == "Identity"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.onnx"]


def test_save_under_a_file_raises(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    with pytest.raises(CalibexportError, match="failed to write ONNX model"):
        save_onnx(_identity(), blocker / "m.onnx")
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
