"""diffusers UNet2DModel folders as sources: loading, embedding flags, schedules and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from calibexport.errors import CalibexportError
from calibexport.exporter.onnx_export import export_onnx
from calibexport.models import load_model

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install "
                                "calibexport[diffusers])")


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(batch, 1, 8, 8, generator=generator), torch.tensor([0.0, 10.5, 49.0])[:batch]


def run_onnx(path: Path, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "t": t.numpy()})[0]


def predict(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x, t)


def save_diffusers_pipeline(folder: Path, *, flip_sin_to_cos: bool, freq_shift: int,
                            prediction_type: str = "epsilon",
                            beta_schedule: str = "linear") -> torch.nn.Module:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
        flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift).eval()
    unet.save_pretrained(str(folder / "unet"))
    diffusers.DDPMScheduler(num_train_timesteps=50, beta_schedule=beta_schedule, beta_start=0.001,
                            beta_end=0.2, prediction_type=prediction_type).save_pretrained(
        str(folder / "scheduler"))
    return unet


def diffusers_output(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return unet(x, t).sample.numpy()


@pytest.mark.parametrize("flip_sin_to_cos,freq_shift", [(False, 1), (True, 0)])
def test_diffusers_loads_exports_and_matches(tmp_path, flip_sin_to_cos, freq_shift):
    unet = save_diffusers_pipeline(tmp_path, flip_sin_to_cos=flip_sin_to_cos,
                                   freq_shift=freq_shift)
    loaded = load_model(tmp_path)
    x, t = inputs()
    expected = diffusers_output(unet, x, t)
    np.testing.assert_array_equal(predict(loaded.module, x, t).numpy(), expected)
    assert loaded.spec.options["flip_sin_to_cos"] is flip_sin_to_cos
    assert loaded.spec.options["freq_shift"] == freq_shift

    export_onnx(loaded.module, tmp_path / "net.onnx", image_shape=(1, 8, 8),
                exporter="torchscript")
    np.testing.assert_allclose(run_onnx(tmp_path / "net.onnx", x, t), expected, atol=1e-5)


def test_diffusers_embedding_flags_change_output(tmp_path):
    # Same weights (seed 0), other embedding order: a loader that ignored the flag would match.
    plain = save_diffusers_pipeline(tmp_path / "a", flip_sin_to_cos=False, freq_shift=1)
    save_diffusers_pipeline(tmp_path / "b", flip_sin_to_cos=True, freq_shift=1)
    flipped = load_model(tmp_path / "b")
    x, t = inputs()
    difference = predict(flipped.module, x, t).numpy() - diffusers_output(plain, x, t)
    assert np.abs(difference).max() > 1e-3


def test_diffusers_scheduler_sets_schedule_and_prediction(tmp_path):
    save_diffusers_pipeline(tmp_path, flip_sin_to_cos=True, freq_shift=0,
                            prediction_type="v_prediction", beta_schedule="scaled_linear")
    loaded = load_model(tmp_path / "unet")
    betas = np.array(loaded.spec.schedule["betas"])
    assert loaded.spec.prediction_type == "v"
    assert len(betas) == 50
    np.testing.assert_allclose(betas[[0, -1]], [0.001, 0.2], rtol=1e-12)
    assert betas[25] == pytest.approx(np.linspace(0.001**0.5, 0.2**0.5, 50)[25] ** 2)


def test_diffusers_without_scheduler_rejected(tmp_path):
    save_diffusers_pipeline(tmp_path, flip_sin_to_cos=True, freq_shift=0)
    (tmp_path / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(CalibexportError, match="no noise schedule for .*scheduler_config.json"):
        load_model(tmp_path)
