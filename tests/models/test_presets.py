"""Presets: documented sizes of the public checkpoints, copies and ModelSpec (de)serialisation."""

from __future__ import annotations

import json

import pytest
import torch

from calibexport.errors import CalibexportError
from calibexport.models import PRESETS, DDPMUNet, ModelSpec, get_preset
from calibexport.runtime.schedule import schedule_from_spec

# Documented sizes of the public checkpoints: DDIM CelebA 64x64 and the converted DDPM
# CIFAR-10 release.
DOCUMENTED_SIZES = {
    "celeba64": (78_700_803, 390),
    "cifar10": (35_746_307, 328),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_SIZES))
def test_preset_parameter_count(name):
    expected_params, expected_tensors = DOCUMENTED_SIZES[name]
    # The meta device allocates no memory, so building these large networks is quick.
    with torch.device("meta"):
        net = DDPMUNet(get_preset(name).unet)

    assert sum(p.numel() for p in net.parameters()) == expected_params
    assert len(net.state_dict()) == expected_tensors


def test_digits_preset_runs():
    torch.manual_seed(0)
    spec = get_preset("digits")
    net = DDPMUNet(spec.unet).eval()
    x = torch.randn(2, spec.unet.in_channels, spec.unet.resolution, spec.unet.resolution)

    with torch.no_grad():
        output = net(x, torch.tensor([0, 999]))

    assert output.shape == x.shape
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_schedule_builds(name):
    schedule = schedule_from_spec(get_preset(name).schedule)

    assert schedule.num_timesteps == 1000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_json_round_trip(name):
    spec = get_preset(name)

    restored = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))

    assert restored.to_dict() == spec.to_dict()
    assert restored.unet == spec.unet


def test_get_preset_returns_copy():
    first = get_preset("cifar10")
    first.unet.ch = 64
    first.schedule["num_timesteps"] = 10

    second = get_preset("cifar10")

    assert second.unet.ch == 128
    assert second.schedule["num_timesteps"] == 1000
    assert PRESETS["cifar10"].unet.ch == 128


def test_unknown_preset():
    with pytest.raises(CalibexportError, match="unknown preset 'celeba'.*celeba64, cifar10"):
        get_preset("celeba")


def test_spec_without_unet_section():
    with pytest.raises(CalibexportError, match="no 'unet' section"):
        ModelSpec.from_dict({"schedule": {}})


def test_spec_unknown_architecture():
    data = {**get_preset("digits").to_dict(), "architecture": "dit"}

    with pytest.raises(CalibexportError, match="unknown architecture 'dit'"):
        ModelSpec.from_dict(data)


def test_spec_unknown_prediction_type():
    data = {**get_preset("digits").to_dict(), "prediction_type": "score"}

    with pytest.raises(CalibexportError, match="invalid prediction type 'score'; valid types: eps"):
        ModelSpec.from_dict(data)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_spec_accepts_x0_and_v(prediction_type):
    data = {**get_preset("digits").to_dict(), "prediction_type": prediction_type}

    assert ModelSpec.from_dict(data).prediction_type == prediction_type
