"""``calibexport build`` flags for the exporter, opset, precision and graph optimization."""

from __future__ import annotations

import json

import onnx
from onnx import TensorProto
from typer.testing import CliRunner

from calibexport.cli.app import app


def invoke(*args: str):
    import calibexport.cli.build  # noqa: F401  (registers the command)

    return CliRunner().invoke(app, ["build", *args])


def test_build_fp16_torchscript_opset_recorded(tmp_path, tiny_model, tiny_eta):
    out = tmp_path / "artifact"
    result = invoke("--model", str(tiny_model), "--eta", str(tiny_eta), "--out", str(out),
                    "--exporter", "torchscript", "--opset", "18", "--precision", "fp16",
                    "--no-validate", "--no-engine")
    assert result.exit_code == 0, result.output
    export = json.loads((out / "manifest.json").read_text())["export"]
    assert (export["exporter"], export["opset"], export["precision"]) == ("torchscript", 18, "fp16")
    assert export["optimized"] is True
    model = onnx.load(str(out / "model.onnx"))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {TensorProto.FLOAT}
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)


def test_build_invalid_precision(tmp_path, tiny_model, tiny_eta):
    result = invoke("--model", str(tiny_model), "--eta", str(tiny_eta), "--out",
                    str(tmp_path / "artifact"), "--precision", "int8", "--no-validate")
    assert result.exit_code == 2
    assert "invalid precision 'int8'; valid choices: fp32, fp16" in result.output
    assert not (tmp_path / "artifact").exists()
