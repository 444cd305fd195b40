"""Fixtures for the exporter tests: a tiny exported DDPMUNet and small hand-built ONNX networks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IMAGE_SHAPE = (1, 8, 8)
ONNX_TYPES = {
    "float16": TensorProto.FLOAT16,
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
}


def _make_network(
    timestep_dtype: str = "float32",
    image_shape: tuple[int, int, int] = IMAGE_SHAPE,
    output_dtype: str = "float32",
    opset: int = 17,
) -> onnx.ModelProto:
    """Build eps = 0.5 * x + 0.01 * t (t broadcast per sample) with onnx.helper.

    Inputs x [batch, C, H, W] float32 and t [batch] in ``timestep_dtype``; output eps in
    ``output_dtype``.
    """
    nodes = [
        helper.make_node("Cast", ["t"], ["t_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["t_f", "shape"], ["t_b"]),
        helper.make_node("Mul", ["t_b", "scale_t"], ["t_term"]),
        helper.make_node("Mul", ["x", "scale_x"], ["x_term"]),
        helper.make_node("Add", ["x_term", "t_term"], ["eps_f32"]),
        helper.make_node("Cast", ["eps_f32"], ["eps"], to=ONNX_TYPES[output_dtype]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, 1, 1, 1], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array(0.01, dtype=np.float32), "scale_t"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale_x"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_network",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *image_shape]),
         helper.make_tensor_value_info("t", ONNX_TYPES[timestep_dtype], ["batch"])],
        [helper.make_tensor_value_info("eps", ONNX_TYPES[output_dtype], ["batch", *image_shape])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _run_onnx(model: onnx.ModelProto | str, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Evaluate the model's only output in ONNX Runtime on the CPU."""
    import onnxruntime as ort

    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "t": t})[0]


@pytest.fixture(scope="session")
def make_network():
    """The ``_make_network`` builder of small hand-written ONNX networks."""
    return _make_network


@pytest.fixture(scope="session")
def run_onnx():
    """The ``_run_onnx`` evaluator: ONNX Runtime on the CPU."""
    return _run_onnx


@pytest.fixture(scope="session")
def unet_onnx(tmp_path_factory) -> str:
    """A random-weight DDPMUNet (resolution 8, one channel) exported with TorchScript (fast)."""
    import torch

    from calibexport.exporter.onnx_export import export_onnx
    from calibexport.models.unet import DDPMUNet, UNetConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    path = tmp_path_factory.mktemp("export") / "network.onnx"
    export_onnx(DDPMUNet(config).eval(), path, image_shape=IMAGE_SHAPE, exporter="torchscript")
    return str(path)
