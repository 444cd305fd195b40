"""Builds with other precisions, exporters, prediction types and sizes, on tiny models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from calibexport.errors import CalibexportError
from calibexport.exporter import onnx_export, onnx_utils
from calibexport.exporter.build import BuildOptions, build_artifact
from calibexport.models import DDPMUNet, UNetConfig
from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from calibexport.runtime.sampler import Sampler, make_eps_fn
from calibexport.runtime.schedule import schedule_from_spec

SCHEDULE = {"kind": "discrete", "beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.2,
            "num_timesteps": 50}
CONFIG = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                    num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
FACTORIES = "calibexport_build_test_factories"


def calm_unet() -> DDPMUNet:
    """A random-weight UNet with a small output, so sampling runs stay well conditioned."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    network = DDPMUNet(CONFIG).eval()
    with torch.no_grad():
        network.conv_out.weight.mul_(0.1)
    return network


class ReparameterizedUNet(torch.nn.Module):
    """``calm_unet`` rewritten to predict x0 or v, with the schedule's log_alpha as a buffer.

    log_alpha is interpolated linearly between integer timesteps, as the discrete schedule does.
    """

    def __init__(self, prediction_type: str) -> None:
        super().__init__()
        self.eps_net = calm_unet()
        self.prediction_type = prediction_type
        log_alpha = schedule_from_spec(SCHEDULE).log_alpha_array
        self.register_buffer("log_alpha", torch.tensor(log_alpha, dtype=torch.float32))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.eps_net(x, t)
        t = t.to(torch.float32).clamp(0, len(self.log_alpha) - 1)
        lower = t.floor().long()
        upper = (lower + 1).clamp(max=len(self.log_alpha) - 1)
        weight = t - lower
        log_alpha = self.log_alpha[lower] + weight * (self.log_alpha[upper] - self.log_alpha[lower])
        alpha = log_alpha.exp()[:, None, None, None]
        sigma = (1 - torch.exp(2 * log_alpha)).sqrt()[:, None, None, None]
        if self.prediction_type == "x0":
            return (x - sigma * eps) / alpha
        return (eps - sigma * x) / alpha


class GrowingNet(torch.nn.Module):
    """(conv(x) + exp(t / 10)) * 1e-5: finite in float32, past float16's range from t = 111."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + torch.exp(t / 10.0)[:, None, None, None]) * 1e-5


def config(prediction_type: str = "eps", steps: int = 50) -> dict:
    return {"image_shape": [1, 8, 8], "prediction_type": prediction_type,
            "schedule": {**SCHEDULE, "num_timesteps": steps}}


def make_eps() -> tuple[torch.nn.Module, dict]:
    return calm_unet(), config()


def make_x0() -> tuple[torch.nn.Module, dict]:
    return ReparameterizedUNet("x0").eval(), config("x0")


def make_v() -> tuple[torch.nn.Module, dict]:
    return ReparameterizedUNet("v").eval(), config("v")


def make_growing() -> tuple[torch.nn.Module, dict]:
    return GrowingNet().eval(), config(steps=150)


@pytest.fixture(autouse=True, scope="module")
def factories():
    module = type(sys)(FACTORIES)
    for name in ("make_eps", "make_x0", "make_v", "make_growing"):
        setattr(module, name, globals()[name])
    sys.modules[FACTORIES] = module
    yield
    del sys.modules[FACTORIES]


@pytest.fixture(scope="module")
def eta_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eta") / "eta.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 1, 8, 8)).astype(np.float32) * 0.05)
    return path


def build(tmp_path: Path, factory: str, eta: Path, **options) -> Path:
    out = tmp_path / factory
    result = build_artifact(BuildOptions(model=f"{FACTORIES}:{factory}", eta=eta, out=out,
                                         exporter="torchscript", **options))
    assert result.passed is not False
    return out


def input_types(model: onnx.ModelProto, op_type: str) -> set[int]:
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in inferred.initializer}
    types.update({v.name: v.type.tensor_type.elem_type
                  for v in (*inferred.input, *inferred.output, *inferred.value_info)})
    return {types[node.input[0]] for node in model.graph.node if node.op_type == op_type}


def test_fp16_build_passes_scan_and_parity(tmp_path, eta_path):
    out = build(tmp_path, "make_eps", eta_path, precision="fp16")
    manifest = json.loads((out / "manifest.json").read_text())
    model = onnx.load(str(out / "model.onnx"))
    assert manifest["export"]["precision"] == "fp16"
    assert manifest["export"]["fp16"]["fp32_islands"]["normalization"] == 21
    assert input_types(model, "Conv") == {TensorProto.FLOAT16}
    assert input_types(model, "Softmax") == {TensorProto.FLOAT}
    assert input_types(model, "Sin") == {TensorProto.FLOAT}
    report = json.loads((out / "parity.json").read_text())
    assert report["tolerances"]["preset"] == "fp16"


def test_fp16_build_fails_on_overflow(tmp_path):
    eta = tmp_path / "eta.npy"
    np.save(eta, np.zeros((150, 1, 8, 8), dtype=np.float32))
    with pytest.raises(CalibexportError, match="overflows at timestep 111"):
        build(tmp_path, "make_growing", eta, precision="fp16")
    assert not (tmp_path / "make_growing").exists()


def test_exporter_and_opset_recorded(tmp_path, eta_path):
    out = build(tmp_path, "make_eps", eta_path, opset=17)
    export = json.loads((out / "manifest.json").read_text())["export"]
    assert export["exporter"] == "torchscript"
    assert export["opset"] == 17
    assert export["precision"] == "fp32"
    batch = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")


def test_large_model_uses_external_data(monkeypatch, tmp_path, eta_path):
    # Lower the protobuf limit so the tiny model counts as past it.
    monkeypatch.setattr(onnx_utils, "PROTOBUF_LIMIT_BYTES", 2**26 + 1)
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT_BYTES", 2**26 + 1)
    out = build(tmp_path, "make_eps", eta_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "model.onnx.data").is_file()
    assert "model.onnx.data" in manifest["files"]
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    with Sampler.from_artifact(out) as sampler:
        assert np.isfinite(sampler.sample(2, steps=4, order=2)).all()


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_x0_and_v_builds_give_the_eps_artifact(tmp_path, eta_path, prediction_type):
    reference = build(tmp_path, "make_eps", eta_path, validate=False)
    out = build(tmp_path, f"make_{prediction_type}", eta_path)
    assert json.loads((out / "manifest.json").read_text())["prediction_type"] == prediction_type
    schedule = schedule_from_spec(SCHEDULE)
    x = np.random.default_rng(1).normal(size=(4, 1, 8, 8)).astype(np.float32)
    t = np.array([1.0, 0.7, 0.31, 0.05])
    with OnnxRuntimeBackend(out / "model.onnx") as deployed, \
            OnnxRuntimeBackend(reference / "model.onnx") as eps_model:
        implied = make_eps_fn(deployed, schedule, prediction_type)(x, t)
        expected = make_eps_fn(eps_model, schedule)(x, t)
    np.testing.assert_allclose(implied, expected, atol=2e-4)
    with Sampler.from_artifact(out) as sampler, Sampler.from_artifact(reference) as eps_sampler:
        np.testing.assert_allclose(sampler.sample(2, steps=6), eps_sampler.sample(2, steps=6),
                                   atol=1e-3)
