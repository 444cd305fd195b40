"""Loading data files never runs code from them: payloads are rejected and never executed.

Each payload is a pickled object whose unpickling would create the directory ``marker``. A test
passes only if loading raises CalibexportError and ``marker`` still does not exist.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibexport.calibration_tables.data import load_data
from calibexport.errors import CalibexportError
from calibexport.models.loaders import load_model, load_spec
from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from calibexport.runtime.eta_table import load_eta_table


class Payload:
    """An object whose unpickling calls os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "marker"
    yield path
    assert not path.exists(), "a payload ran while a file was loaded"


def test_payload_runs_when_unpickled(tmp_path):
    # The payload works: plain pickle runs it, so the tests below can detect a load that does.
    target = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(target)))
    assert target.is_dir()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("layout", ["zip", "legacy", "plain_pickle"])
def test_torch_checkpoint_payload_rejected(tmp_path, tiny_model, marker, layout):
    import torch

    path = tmp_path / "model.pt"
    content = {"state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}
    if layout == "zip":
        torch.save(content, path)
    elif layout == "legacy":
        torch.save(content, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(content))
    with pytest.raises(CalibexportError, match="needs arbitrary unpickling to load"):
        load_model(path, config=str(tiny_model.with_suffix(".json")))


def test_eta_table_payload_rejected(tmp_path, marker):
    path = tmp_path / "eta.npy"
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(CalibexportError, match="truncated or not a .npy array"):
        load_eta_table(path)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_data_array_payload_rejected(tmp_path, marker, suffix):
    path = tmp_path / f"images{suffix}"
    payload = np.array([Payload(marker)], dtype=object)
    if suffix == ".npy":
        np.save(path, payload, allow_pickle=True)
    else:
        np.savez(path, images=payload)
    with pytest.raises(CalibexportError, match=r"cannot read (data file|array 'images' of)"):
        load_data(path, channels=1, resolution=8)


def test_yaml_config_python_tag_rejected(tmp_path, marker):
    path = tmp_path / "config.yml"
    path.write_text(f"model: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(CalibexportError, match=r"config\.yml"):
        load_spec(path)


def onnx_network(nodes, initializers=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "network",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 2, 2]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def test_onnx_custom_operator_not_loaded(tmp_path):
    # ONNX Runtime runs only the operators it was built with or that the caller registers.
    model = onnx_network([helper.make_node("Run", ["x"], ["eps"], domain="com.example")],
                         opsets=(("", 17), ("com.example", 1)))
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(CalibexportError, match=r"ONNX Runtime could not load .*com\.example"):
        OnnxRuntimeBackend(path)


def test_onnx_external_data_outside_folder_rejected(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    weight = numpy_helper.from_array(np.zeros(4, np.float32), "weight")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    shape = numpy_helper.from_array(np.array([1, 1, 2, 2], np.int64), "shape")
    model = onnx_network([helper.make_node("Reshape", ["weight", "shape"], ["weight_4d"]),
                          helper.make_node("Add", ["x", "weight_4d"], ["eps"])],
                         initializers=[weight, shape])
    (tmp_path / "artifact").mkdir()
    path = tmp_path / "artifact" / "model.onnx"
    path.write_bytes(model.SerializeToString())

    with pytest.raises(CalibexportError, match="External data path validation failed"):
        OnnxRuntimeBackend(path)
    with pytest.raises(onnx.checker.ValidationError, match="points outside the directory"):
        onnx.load(str(path))
