"""fp16 conversion with float32 islands, and the NaN/Inf scan, on real exports in ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from calibexport.errors import CalibexportError
from calibexport.exporter.fold import fold_eta, save_onnx
from calibexport.exporter.fp16 import Fp16Report, convert_to_fp16
from calibexport.exporter.fp16_scan import scan_fp16_range, scan_non_finite
from calibexport.exporter.onnx_export import export_onnx
from calibexport.models.unet import DDPMUNet, UNetConfig

IMAGE_SHAPE = (1, 8, 8)
CONFIG = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                    num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
# Float16 keeps about 3 decimal digits; outputs of this size differ from float32 by ~1e-3.
FP16_ATOL = 2e-2


def tiny_unet(seed: int = 0) -> DDPMUNet:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    return DDPMUNet(CONFIG).eval()


def overflowing_unet() -> tuple[DDPMUNet, float, float]:
    """A UNet whose residual activations pass 300 and whose attention logits pass 12.

    Returns the network, its largest residual activation and its largest attention logit on a
    batch of N(0, I) images, measured with forward hooks.
    """
    module = tiny_unet(1)
    with torch.no_grad():
        module.conv_in.weight.mul_(300.0)
        module.conv_in.bias.mul_(300.0)
        for attention in (module.mid.attn_1, *module.down[1].attn, *module.up[1].attn):
            attention.q.weight.mul_(30.0)
            attention.k.weight.mul_(30.0)
    peaks = {"activation": 0.0, "logit": 0.0}

    def record_activation(_module, _inputs, output):
        peaks["activation"] = max(peaks["activation"], float(output.abs().max()))

    def record_logits(attention, inputs, _output):
        h = attention.norm(inputs[0])
        q, k = attention.q(h).flatten(2), attention.k(h).flatten(2)
        logits = torch.bmm(q.transpose(1, 2), k) * q.shape[1] ** -0.5
        peaks["logit"] = max(peaks["logit"], float(logits.max()))

    handles = [module.conv_in.register_forward_hook(record_activation),
               module.mid.attn_1.register_forward_hook(record_logits)]
    with torch.no_grad():
        module(torch.randn(4, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)),
               torch.tensor([0.0, 10.0, 500.0, 999.0]))
    for handle in handles:
        handle.remove()
    return module, peaks["activation"], peaks["logit"]


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> tuple[DDPMUNet, onnx.ModelProto]:
    module = tiny_unet()
    path = tmp_path_factory.mktemp("fp16") / "network.onnx"
    export_onnx(module, path, image_shape=IMAGE_SHAPE, exporter="torchscript")
    return module, onnx.load(str(path))


@pytest.fixture(scope="module")
def converted(network) -> tuple[onnx.ModelProto, Fp16Report]:
    report = Fp16Report()
    return convert_to_fp16(network[1], report=report), report


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.input, *graph.output, *graph.value_info):
        types[value.name] = value.type.tensor_type.elem_type
    return types


def input_types(model: onnx.ModelProto, op_types: set[str]) -> set[int]:
    """The element types of the first input of every node of the given op types."""
    types = value_types(model)
    return {types[node.input[0]] for node in model.graph.node if node.op_type in op_types}


def run(model: onnx.ModelProto, x: np.ndarray, t: np.ndarray, outputs=None) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"x": x, "t": t})


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)


def test_interface_stays_float32(converted):
    model, _ = converted
    types = {value.name: value.type.tensor_type.elem_type
             for value in (*model.graph.input, *model.graph.output)}
    assert types == {"x": TensorProto.FLOAT, "t": TensorProto.FLOAT, "eps": TensorProto.FLOAT}


def test_convolutions_run_in_float16(converted):
    model, report = converted
    assert input_types(model, {"Conv"}) == {TensorProto.FLOAT16}
    assert report.fp16_nodes > 100


def test_normalization_island_is_float32(converted):
    model, report = converted
    assert input_types(model, {"InstanceNormalization", "GroupNormalization"}) == {
        TensorProto.FLOAT}
    assert len(report.islands["normalization"]) == 21


def test_softmax_island_includes_logits(converted):
    model, report = converted
    assert input_types(model, {"Softmax"}) == {TensorProto.FLOAT}
    types = value_types(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    for softmax in (node for node in model.graph.node if node.op_type == "Softmax"):
        scale = producers[softmax.input[0]]
        assert producers[scale.input[0]].op_type == "MatMul"
        assert types[producers[scale.input[0]].output[0]] == TensorProto.FLOAT
    assert len(report.islands["attention_softmax"]) == 12


def test_timestep_embedding_island_is_float32(converted):
    model, report = converted
    assert input_types(model, {"Sin", "Cos"}) == {TensorProto.FLOAT}
    assert input_types(model, {"Gemm"}) == {TensorProto.FLOAT}
    assert report.islands["timestep_branch"]


def test_fp16_matches_float32_torch(network, converted):
    module, _ = network
    x = images(4)
    t = np.array([0.0, 250.5, 937.0, 999.0], dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    (got,) = run(converted[0], x, t)
    np.testing.assert_allclose(got, expected, atol=FP16_ATOL)
    assert np.abs(got - expected).max() > 1e-6  # the network did run in float16


def sin_input(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Return a copy of ``model`` that also outputs the input of its Sin node."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    name = next(node.input[0] for node in exposed.graph.node if node.op_type == "Sin")
    exposed.graph.output.append(helper.make_tensor_value_info(name, value_types(model)[name],
                                                              None))
    return exposed, name


def test_timestep_937_reaches_embedding_exactly(network, converted):
    half = CONFIG.ch // 2
    frequencies = np.exp(np.arange(half, dtype=np.float32)
                         * np.float32(-math.log(10000.0) / (half - 1)))
    expected = np.float32(937.0) * frequencies
    x, t = images(1), np.array([937.0], dtype=np.float32)

    model, name = sin_input(converted[0])
    (angles,) = run(model, x, t, [name])
    np.testing.assert_allclose(angles[0], expected, rtol=1e-6)

    naive, naive_name = sin_input(convert_to_fp16(network[1], islands=False))
    (naive_angles,) = run(naive, x, t, [naive_name])
    assert np.abs(naive_angles[0].astype(np.float32) - expected).max() > 0.05


def test_overflow_case_stays_finite_and_accurate(tmp_path):
    module, activation, logit = overflowing_unet()
    assert activation > 300
    assert logit > 12
    path = tmp_path / "network.onnx"
    export_onnx(module, path, image_shape=IMAGE_SHAPE, exporter="torchscript")
    model = convert_to_fp16(onnx.load(str(path)))
    eta = np.random.default_rng(0).normal(size=(20, *IMAGE_SHAPE)).astype(np.float32) * 0.1
    folded = fold_eta(model, eta)
    save_onnx(folded, tmp_path / "model.onnx")
    scan_non_finite(tmp_path / "model.onnx", num_timesteps=20)

    x, t = images(3, seed=4), np.array([0.0, 7.0, 19.0], dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x), torch.from_numpy(t)).numpy() - eta[[0, 7, 19]]
    (got,) = run(folded, x, t)
    np.testing.assert_allclose(got, expected, atol=FP16_ATOL)


def test_eta_subtraction_runs_in_float32(converted):
    eta = np.random.default_rng(0).normal(size=(10, *IMAGE_SHAPE)).astype(np.float32)
    folded = fold_eta(converted[0], eta)
    subtract = next(node for node in folded.graph.node if node.name.endswith("/subtract"))
    types = value_types(folded)
    assert {types[name] for name in subtract.input} == {TensorProto.FLOAT}


class GrowingNet(torch.nn.Module):
    """eps = (conv(x) + exp(t / 10)) * 1e-5, whose sum passes float16's 65504 from t = 111 on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(0.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + torch.exp(t / 10.0)[:, None, None, None]) * 1e-5


@pytest.fixture(scope="module")
def growing_network(tmp_path_factory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("growing") / "network.onnx"
    export_onnx(GrowingNet(), path, image_shape=IMAGE_SHAPE, exporter="torchscript")
    return onnx.load(str(path))


def test_range_scan_names_first_overflowing_timestep(growing_network):
    report = Fp16Report()
    convert_to_fp16(growing_network, report=report)
    with pytest.raises(CalibexportError, match=r"overflows at timestep 111 \(the first of 39 "):
        scan_fp16_range(growing_network, report.fp16_values, num_timesteps=150)


def test_range_scan_passes_below_limit(growing_network):
    report = Fp16Report()
    convert_to_fp16(growing_network, report=report)
    scan_fp16_range(growing_network, report.fp16_values, num_timesteps=100)


def test_output_scan_names_first_non_finite_timestep(tmp_path, growing_network):
    # Past t = 887, exp(t / 10) overflows even float32, so the output itself becomes Inf.
    eta = np.zeros((900, *IMAGE_SHAPE), dtype=np.float32)
    save_onnx(fold_eta(convert_to_fp16(growing_network), eta), tmp_path / "model.onnx")
    with pytest.raises(CalibexportError, match=r"NaN or Inf at timestep 888 \(the first of 12 "):
        scan_non_finite(tmp_path / "model.onnx", num_timesteps=900, batch_size=64)


def test_output_scan_passes_finite_model(tmp_path, growing_network):
    eta = np.zeros((150, *IMAGE_SHAPE), dtype=np.float32)
    save_onnx(fold_eta(convert_to_fp16(growing_network), eta), tmp_path / "model.onnx")
    scan_non_finite(tmp_path / "model.onnx", num_timesteps=150)


def test_control_flow_rejected(make_network):
    model = make_network()
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node(
        "If", ["condition"], ["unused"], then_branch=branch, else_branch=branch))
    model.graph.input.append(helper.make_tensor_value_info("condition", TensorProto.BOOL, []))
    with pytest.raises(CalibexportError, match="has a subgraph; fp16 conversion"):
        convert_to_fp16(model)
