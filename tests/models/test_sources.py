"""Loading networks from TorchScript archives, module:function factories and diffusers folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from calibexport.errors import CalibexportError
from calibexport.exporter.onnx_export import export_onnx
from calibexport.models import DDPMUNet, UNetConfig, load_model
from calibexport.models.torchscript import is_torchscript_archive

SCHEDULE = {"kind": "discrete", "beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.2,
            "num_timesteps": 50}
TINY = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), dropout=0.0)
FACTORY_MODULE = "calibexport_test_factories"


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(batch, 1, 8, 8, generator=generator), torch.tensor([0.0, 10.5, 49.0])[:batch]


def run_onnx(path: Path, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "t": t.numpy()})[0]


def predict(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x, t)


# TorchScript archives -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> tuple[Path, DDPMUNet]:
    torch.manual_seed(3)
    network = DDPMUNet(TINY).eval()
    path = tmp_path_factory.mktemp("torchscript") / "net.pt"
    x, t = inputs()
    torch.jit.save(torch.jit.trace(network, (x, t), check_trace=False), str(path))
    config = {"architecture": "torchscript", "image_shape": [1, 8, 8], "schedule": SCHEDULE,
              "prediction_type": "eps"}
    path.with_suffix(".json").write_text(json.dumps(config))
    return path, network


def test_torchscript_archive_detected(scripted, tmp_path):
    plain = tmp_path / "state.pt"
    torch.save(scripted[1].state_dict(), plain)
    assert is_torchscript_archive(scripted[0])
    assert not is_torchscript_archive(plain)


def test_torchscript_loads_and_matches(scripted):
    path, network = scripted
    loaded = load_model(path)
    x, t = inputs()
    torch.testing.assert_close(predict(loaded.module, x, t), predict(network, x, t))
    assert loaded.source["format"] == "torchscript"
    assert loaded.spec.image_shape == (1, 8, 8)
    assert loaded.spec.schedule == SCHEDULE


def test_torchscript_exports_and_matches(scripted, tmp_path):
    loaded = load_model(scripted[0])
    info = export_onnx(loaded.module, tmp_path / "net.onnx", image_shape=(1, 8, 8))
    x, t = inputs()
    assert info.exporter == "torchscript"
    np.testing.assert_allclose(run_onnx(tmp_path / "net.onnx", x, t),
                               predict(scripted[1], x, t).numpy(), atol=1e-5)


def test_torchscript_without_config_rejected(scripted, tmp_path):
    lonely = tmp_path / "lonely.pt"
    lonely.write_bytes(scripted[0].read_bytes())
    with pytest.raises(CalibexportError, match="no model config for .*lonely.pt.*image_shape"):
        load_model(lonely)


# module:function factories ------------------------------------------------------------------------


class OffsetNet(torch.nn.Module):
    """A custom architecture: a convolution plus a learned per-timestep-scale offset."""

    def __init__(self, channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.conv(x))) * torch.cos(t / 50.0)[:, None, None, None]


def make_ready() -> tuple[OffsetNet, dict]:
    torch.manual_seed(11)
    return OffsetNet().eval(), {"image_shape": [1, 8, 8], "schedule": SCHEDULE,
                                "prediction_type": "x0"}


def make_architecture(width: int) -> OffsetNet:
    return OffsetNet(width=width)


def make_bare() -> OffsetNet:
    return OffsetNet()


def make_wrong_type() -> str:
    return "not a network"


@pytest.fixture(autouse=True, scope="module")
def factory_module():
    """Register this file's factories under an importable module name."""
    module = type(sys)(FACTORY_MODULE)
    for name in ("make_ready", "make_architecture", "make_bare", "make_wrong_type"):
        setattr(module, name, globals()[name])
    sys.modules[FACTORY_MODULE] = module
    yield
    del sys.modules[FACTORY_MODULE]


def test_factory_returning_network_and_config():
    loaded = load_model(f"{FACTORY_MODULE}:make_ready")
    x, t = inputs()
    torch.testing.assert_close(predict(loaded.module, x, t), predict(make_ready()[0], x, t))
    assert loaded.spec.prediction_type == "x0"
    assert loaded.spec.options["factory"] == f"{FACTORY_MODULE}:make_ready"
    assert loaded.source["format"] == "factory"


def test_factory_with_checkpoint_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBEXPORT_TRUST_CODE", "1")
    torch.manual_seed(5)
    trained = OffsetNet(width=6)
    weights = tmp_path / "custom.pt"
    torch.save(trained.state_dict(), weights)
    config = tmp_path / "custom.json"
    config.write_text(json.dumps({
        "architecture": "factory", "image_shape": [1, 8, 8], "schedule": SCHEDULE,
        "options": {"factory": f"{FACTORY_MODULE}:make_architecture",
                    "factory_kwargs": {"width": 6}}}))
    loaded = load_model(weights, config=config)
    x, t = inputs()
    torch.testing.assert_close(predict(loaded.module, x, t), predict(trained, x, t))


def _factory_files(tmp_path: Path, config_width: int) -> tuple[Path, Path]:
    """Write width-6 OffsetNet weights and a factory config that builds width ``config_width``."""
    weights = tmp_path / "custom.pt"
    torch.save(OffsetNet(width=6).state_dict(), weights)
    config = tmp_path / "custom.json"
    config.write_text(json.dumps({
        "architecture": "factory", "image_shape": [1, 8, 8],
        "options": {"factory": f"{FACTORY_MODULE}:make_architecture",
                    "factory_kwargs": {"width": config_width}}}))
    return weights, config


def test_factory_config_needs_trust(tmp_path, monkeypatch):
    monkeypatch.delenv("CALIBEXPORT_TRUST_CODE", raising=False)
    weights, config = _factory_files(tmp_path, config_width=6)
    with pytest.raises(CalibexportError, match="CALIBEXPORT_TRUST_CODE=1"):
        load_model(weights, config=config)


def test_factory_checkpoint_key_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBEXPORT_TRUST_CODE", "1")
    weights, config = _factory_files(tmp_path, config_width=4)
    with pytest.raises(CalibexportError, match="shape mismatches"):
        load_model(weights, config=config)


def test_factory_without_config_rejected():
    with pytest.raises(CalibexportError, match="returned a network without a config"):
        load_model(f"{FACTORY_MODULE}:make_bare")


def test_factory_with_config_file(tmp_path):
    config = tmp_path / "spec.json"
    config.write_text(json.dumps({"architecture": "factory", "image_shape": [1, 8, 8],
                                  "schedule": SCHEDULE, "prediction_type": "v"}))
    loaded = load_model(f"{FACTORY_MODULE}:make_bare", config=config)
    assert loaded.spec.prediction_type == "v"


def test_factory_wrong_return_type():
    with pytest.raises(CalibexportError, match="returned a str; it must return a torch.nn.Module"):
        load_model(f"{FACTORY_MODULE}:make_wrong_type")


def test_factory_missing_module():
    with pytest.raises(CalibexportError, match="cannot import module 'no_such_package_xyz.nets'"):
        load_model("no_such_package_xyz.nets:build")


def test_factory_missing_function():
    with pytest.raises(CalibexportError, match="has no callable 'missing'"):
        load_model(f"{FACTORY_MODULE}:missing")
