"""Exporting networks to ONNX with both torch exporters, checked in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calibexport.errors import CalibexportError
from calibexport.exporter.onnx_export import ExportInfo, check_exported_graph, export_onnx

from calibexport.models.unet import DDPMUNet, UNetConfig

IMAGE_SHAPE = (1, 8, 8)
T_MAX = 999


def tiny_unet() -> DDPMUNet:
    """A random-weight DDPMUNet at resolution 8 with one channel, in eval mode."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return DDPMUNet(config).eval()


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)


def torch_eps(module: torch.nn.Module, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x), torch.from_numpy(t)).numpy()


class ScalarTimestepNet(torch.nn.Module):
    """Accepts the timestep as a Python int, a 0-d tensor or a [B] tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.conv(x) * torch.cos(t / 100.0)[:, None, None, None]


class FloatOfTimestepNet(torch.nn.Module):
    """Reads the timestep through float(), which tracing turns into a constant."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * float(t[0])


class BatchAsIntNet(torch.nn.Module):
    """Reads the batch size through int(), which tracing can freeze at the example batch."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(int(x.shape[0]), -1) * t[:, None]
        return flat.reshape(x.shape)


class ShapeOnlyTimestepNet(torch.nn.Module):
    """Uses only the shape of the timestep, never its values."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * 2.0 + t.shape[0]


@pytest.fixture(scope="module")
def dynamo_export(tmp_path_factory):
    module = tiny_unet()
    path = tmp_path_factory.mktemp("dynamo") / "network.onnx"
    info = export_onnx(module, path, image_shape=IMAGE_SHAPE, exporter="dynamo")
    return module, str(path), info


@pytest.fixture(scope="module")
def torchscript_export(tmp_path_factory):
    module = tiny_unet()
    path = tmp_path_factory.mktemp("torchscript") / "network.onnx"
    info = export_onnx(module, path, image_shape=IMAGE_SHAPE, exporter="torchscript")
    return module, str(path), info


@pytest.fixture(params=["dynamo", "torchscript"])
def unet_export(request):
    return request.getfixturevalue(f"{request.param}_export")


@pytest.mark.parametrize("batch", [1, 3])
def test_export_matches_torch(unet_export, run_onnx, batch):
    module, path, _ = unet_export
    x = images(batch)
    t = np.linspace(0, T_MAX, batch).astype(np.float32)
    error = np.max(np.abs(run_onnx(path, x, t) - torch_eps(module, x, t)))
    assert error < 1e-4


def test_export_non_integer_timestep(unet_export, run_onnx):
    module, path, _ = unet_export
    x = images(2)
    t = np.array([12.25, 637.5], dtype=np.float32)
    error = np.max(np.abs(run_onnx(path, x, t) - torch_eps(module, x, t)))
    assert error < 1e-4


def test_export_timestep_changes_output(unet_export, run_onnx):
    _, path, _ = unet_export
    x = images(2)
    at_zero = run_onnx(path, x, np.zeros(2, dtype=np.float32))
    at_max = run_onnx(path, x, np.full(2, T_MAX, dtype=np.float32))
    assert np.max(np.abs(at_zero - at_max)) > 1e-3


def test_export_interface(unet_export):
    _, path, _ = unet_export
    model = onnx.load(path)
    assert [v.name for v in model.graph.input] == ["x", "t"]
    assert [v.name for v in model.graph.output] == ["eps"]
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


def test_export_single_file(unet_export):
    _, path, _ = unet_export
    model = onnx.load(path, load_external_data=False)
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL
                   for init in model.graph.initializer)


def test_export_info(unet_export):
    _, path, info = unet_export
    assert isinstance(info, ExportInfo)
    assert info.opset == onnx.load(path).opset_import[0].version
    assert info.torch_version == torch.__version__
    assert info.timestep_dtype == "float32"
    assert info.seconds > 0


def test_export_leaves_no_temporary_files(unet_export):
    _, path, _ = unet_export
    parent = Path(path).parent
    assert sorted(p.name for p in parent.iterdir()) == ["network.onnx"]


@pytest.mark.parametrize("opset", [17, 18, 21])
def test_torchscript_opsets_match_torch(tmp_path, run_onnx, opset):
    # GroupNorm lowers differently per opset (a native op only from opset 21).
    module = tiny_unet()
    path = tmp_path / "network.onnx"
    info = export_onnx(module, path, image_shape=IMAGE_SHAPE, exporter="torchscript", opset=opset)
    x = images(2)
    t = np.array([5.0, 900.0], dtype=np.float32)
    assert info.opset == opset
    assert np.max(np.abs(run_onnx(str(path), x, t) - torch_eps(module, x, t))) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("opset", [18, 21])
def test_dynamo_opsets_match_torch(tmp_path, run_onnx, opset):
    module = tiny_unet()
    path = tmp_path / "network.onnx"
    info = export_onnx(module, path, image_shape=IMAGE_SHAPE, exporter="dynamo", opset=opset)
    x = images(2)
    t = np.array([5.0, 900.0], dtype=np.float32)
    assert info.opset == opset
    assert np.max(np.abs(run_onnx(str(path), x, t) - torch_eps(module, x, t))) < 1e-4


@pytest.mark.slow
def test_dynamo_opset_17_rejected(tmp_path):
    # torch 2.13 cannot convert this UNet below opset 18 and keeps 18 with only a log warning.
    with pytest.raises(CalibexportError, match="wrote opset 18 although opset 17 was requested"):
        export_onnx(tiny_unet(), tmp_path / "n.onnx", image_shape=IMAGE_SHAPE,
                    exporter="dynamo", opset=17)
    assert not (tmp_path / "n.onnx").exists()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_scalar_timestep_module(tmp_path, run_onnx, exporter):
    module = ScalarTimestepNet().eval()
    path = tmp_path / "network.onnx"
    export_onnx(module, path, image_shape=IMAGE_SHAPE, exporter=exporter)
    x = images(3)
    t = np.array([0.0, 150.0, T_MAX], dtype=np.float32)
    assert [v.name for v in onnx.load(str(path)).graph.input] == ["x", "t"]
    assert np.max(np.abs(run_onnx(str(path), x, t) - torch_eps(module, x, t))) < 1e-5
    python_int = module(torch.from_numpy(x[:1]), 150).detach().numpy()
    assert np.max(np.abs(run_onnx(str(path), x[:1], t[1:2]) - python_int)) < 1e-5


def test_torchscript_float_of_timestep_rejected(tmp_path):
    with pytest.raises(CalibexportError, match="baked the timestep in as a constant"):
        export_onnx(FloatOfTimestepNet(), tmp_path / "n.onnx", image_shape=IMAGE_SHAPE,
                    exporter="torchscript")
    assert not (tmp_path / "n.onnx").exists()


def test_dynamo_float_of_timestep_stays_input(tmp_path, run_onnx):
    path = tmp_path / "n.onnx"
    export_onnx(FloatOfTimestepNet(), path, image_shape=IMAGE_SHAPE, exporter="dynamo")
    x = images(2)
    got = run_onnx(str(path), x, np.array([3.0, 3.0], dtype=np.float32))
    np.testing.assert_allclose(got, 3.0 * x, rtol=1e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_shape_only_timestep_rejected(tmp_path, exporter):
    with pytest.raises(CalibexportError, match="does not depend on the values of input 't'"):
        export_onnx(ShapeOnlyTimestepNet(), tmp_path / "n.onnx", image_shape=IMAGE_SHAPE,
                    exporter=exporter)


@pytest.mark.parametrize("dtype", ["int32", "int64", "float64"])
def test_export_timestep_dtypes(tmp_path, run_onnx, dtype):
    module = tiny_unet()
    path = tmp_path / "network.onnx"
    info = export_onnx(module, path, image_shape=IMAGE_SHAPE, timestep_dtype=dtype,
                       exporter="torchscript")
    model = onnx.load(str(path))
    assert info.timestep_dtype == dtype
    assert model.graph.input[1].type.tensor_type.elem_type == (
        onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    x = images(2)
    t = np.array([3, 700], dtype=dtype)
    assert np.max(np.abs(run_onnx(str(path), x, t) - torch_eps(module, x, t))) < 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_example_batch_one_stays_dynamic(tmp_path, run_onnx, exporter):
    module = ScalarTimestepNet().eval()
    path = tmp_path / "network.onnx"
    export_onnx(module, path, image_shape=IMAGE_SHAPE, exporter=exporter, example_batch=1)
    x = images(4)
    t = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    assert run_onnx(str(path), x, t).shape == (4, *IMAGE_SHAPE)


@pytest.mark.parametrize(
    ("exporter", "example_batch", "message"),
    [("dynamo", 1, "batch axis of 'x' is not symbolic"),
     ("dynamo", 2, "batch axis of 'x' is not symbolic"),
     ("torchscript", 1, "fails at batch 2"),
     ("torchscript", 2, "fails at batch 3")],
)
def test_export_frozen_batch_rejected(tmp_path, exporter, example_batch, message):
    with pytest.raises(CalibexportError, match=message):
        export_onnx(BatchAsIntNet(), tmp_path / "n.onnx", image_shape=IMAGE_SHAPE,
                    exporter=exporter, example_batch=example_batch)
    assert not (tmp_path / "n.onnx").exists()


def test_export_restores_training_mode(tmp_path):
    module = ScalarTimestepNet().train()
    export_onnx(module, tmp_path / "n.onnx", image_shape=IMAGE_SHAPE, exporter="torchscript")
    assert module.training


def test_export_invalid_exporter(tmp_path):
    with pytest.raises(CalibexportError, match="invalid exporter 'jit'"):
        export_onnx(ScalarTimestepNet(), tmp_path / "n.onnx", image_shape=IMAGE_SHAPE,
                    exporter="jit")


def test_export_invalid_timestep_dtype(tmp_path):
    with pytest.raises(CalibexportError, match="invalid timestep dtype uint8"):
        export_onnx(ScalarTimestepNet(), tmp_path / "n.onnx", image_shape=IMAGE_SHAPE,
                    timestep_dtype=np.uint8)


def test_export_wrong_image_shape(tmp_path):
    with pytest.raises(CalibexportError, match="ONNX export with the torchscript exporter failed"):
        export_onnx(tiny_unet(), tmp_path / "n.onnx", image_shape=(3, 8, 8),
                    exporter="torchscript")


def test_check_graph_static_batch_rejected(make_network):
    model = make_network()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(CalibexportError, match="batch axis of 'x' is not symbolic"):
        check_exported_graph(model, image_shape=IMAGE_SHAPE, timestep_dtype=np.float32)


def test_check_graph_dtype_mismatch(make_network):
    with pytest.raises(CalibexportError, match="input 't' has ONNX type INT64, expected FLOAT"):
        check_exported_graph(make_network(timestep_dtype="int64"), image_shape=IMAGE_SHAPE,
                             timestep_dtype=np.float32)


def test_check_graph_accepts_network(make_network):
    check_exported_graph(make_network(), image_shape=IMAGE_SHAPE, timestep_dtype=np.float32)
