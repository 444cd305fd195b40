"""Shared fixtures: a tiny real model, a real eta table and a real built artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_SCHEDULE = {
    "kind": "discrete",
    "beta_schedule": "linear",
    "beta_start": 0.001,
    "beta_end": 0.2,
    "num_timesteps": 100,
}


def tiny_spec():
    from calibexport.models import ModelSpec, UNetConfig

    unet = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), dropout=0.0)
    return ModelSpec(unet=unet, schedule=dict(TINY_SCHEDULE))


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """Save a random-weight tiny UNet in the native format and return the weights path."""
    import torch

    from calibexport.models import DDPMUNet
    from calibexport.models.native_format import save_native

    torch.manual_seed(seed)
    module = DDPMUNet(tiny_spec().unet)
    save_native(path, module.state_dict(), tiny_spec())
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_eta(tmp_path_factory, tiny_model) -> Path:
    """A table estimated for the tiny model with a few samples per row (a real calibrate run)."""
    import torch

    from calibexport.calibration_tables.calibrate import calibrate_to_file

    torch.set_num_threads(1)
    data = np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32)
    data_path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(data_path, data)
    out = tmp_path_factory.mktemp("eta") / "eta.npy"
    calibrate_to_file(model=tiny_model, data=str(data_path), out=out, num_samples=4, batch_size=200,
                      progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_model, tiny_eta) -> Path:
    """A validated build of the tiny model."""
    from calibexport.exporter.build import BuildOptions, build_artifact

    out = tmp_path_factory.mktemp("build") / "tiny"
    result = build_artifact(BuildOptions(model=tiny_model, eta=tiny_eta, out=out))
    assert result.passed, "the tiny artifact failed its own parity checks"
    return out
