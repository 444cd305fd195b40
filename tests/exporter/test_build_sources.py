"""Builds from a TorchScript archive and a diffusers folder: export, fold and validate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calibexport.exporter.build import BuildOptions, build_artifact
from calibexport.exporter.fold_file import fold_file
from calibexport.exporter.onnx_export import export_onnx
from calibexport.models import DDPMUNet, UNetConfig, load_model
from calibexport.runtime.sampler import Sampler

SCHEDULE = {"kind": "discrete", "beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.2,
            "num_timesteps": 50}


@pytest.fixture(scope="module")
def eta_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eta") / "eta.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 1, 8, 8)).astype(np.float32) * 0.05)
    return path


def build(model: Path, eta: Path, out: Path, **options) -> dict:
    result = build_artifact(BuildOptions(model=model, eta=eta, out=out, **options))
    assert result.passed
    with Sampler.from_artifact(out) as sampler:
        assert np.isfinite(sampler.sample(2, steps=4, order=2)).all()
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_torchscript_archive_builds(tmp_path, eta_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    network = DDPMUNet(config).eval()
    with torch.no_grad():
        network.conv_out.weight.mul_(0.1)
    archive = tmp_path / "net.pt"
    example = (torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]))
    torch.jit.save(torch.jit.trace(network, example, check_trace=False), str(archive))
    archive.with_suffix(".json").write_text(json.dumps(
        {"architecture": "torchscript", "image_shape": [1, 8, 8], "schedule": SCHEDULE}))
    manifest = build(archive, eta_path, tmp_path / "out")
    assert manifest["export"]["exporter"] == "torchscript"
    assert manifest["source"]["model_path"] == str(archive.resolve())


@pytest.mark.slow
def test_diffusers_folder_builds_and_folds(tmp_path, eta_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
    unet.save_pretrained(str(tmp_path / "pipe" / "unet"))
    diffusers.DDPMScheduler(num_train_timesteps=50, beta_start=0.001, beta_end=0.2,
                            prediction_type="sample").save_pretrained(
        str(tmp_path / "pipe" / "scheduler"))
    manifest = build(tmp_path / "pipe", eta_path, tmp_path / "out", exporter="torchscript")
    assert manifest["prediction_type"] == "x0"

    # The same network exported on its own and folded with `calibexport fold` gives the build.
    loaded = load_model(tmp_path / "pipe")
    export_onnx(loaded.module, tmp_path / "unet.onnx", image_shape=(1, 8, 8),
                exporter="torchscript")
    fold_file(tmp_path / "unet.onnx", eta_path, tmp_path / "folded.onnx", prediction_type="x0",
              schedule=SCHEDULE)
    import onnxruntime as ort

    x = np.random.default_rng(2).normal(size=(3, 1, 8, 8)).astype(np.float32)
    feeds = {"x": x, "t": np.array([0.0, 20.5, 49.0], dtype=np.float32)}
    built = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, feeds)[0]
    folded = ort.InferenceSession(str(tmp_path / "folded.onnx")).run(None, feeds)[0]
    np.testing.assert_allclose(folded, built, atol=1e-5)
    assert onnx.load(str(tmp_path / "folded.onnx")).graph.output[0].name == "eps"
