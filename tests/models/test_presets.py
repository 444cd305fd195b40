"""Presets: documented sizes of the public checkpoints, copies and ModelSpec (de)serialisation."""

from __future__ import annotations

import json

import numpy as np
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


# Times that the fast singlestep DPM-Solver queries at NFE 20 in the published calibrated runs.
PUBLISHED_NFE20_TIMES = np.array([
    1.0, 0.94730, 0.89151, 0.83204, 0.76808, 0.69853, 0.62198, 0.53674, 0.44176, 0.33928,
    0.23886, 0.15480, 0.094623, 0.055695, 0.031752, 0.017398, 0.0089958, 0.0042846, 0.0018493,
    0.00045066,
])


def test_schedule_preset_in_config():
    from calibexport.runtime.schedule import LinearVPSchedule

    data = {**get_preset("digits").to_dict(), "schedule": "published-linear"}
    spec = ModelSpec.from_dict(data)
    schedule = schedule_from_spec(spec.schedule)

    assert spec.schedule["preset"] == "published-linear"
    assert isinstance(schedule, LinearVPSchedule)
    assert (schedule.beta_0, schedule.beta_1) == (0.1, 20.0)
    assert schedule.timestep_scale == 1000.0
    assert schedule.t_shift == 0.001
    assert schedule.default_t_end == spec.schedule["t_end"] == 1e-4
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).schedule == spec.schedule


def test_published_linear_table_grid():
    from calibexport.calibration_tables.estimate import table_coefficients
    from calibexport.models.presets import resolve_schedule

    schedule = schedule_from_spec(resolve_schedule("published-linear"))
    alpha, sigma = table_coefficients(schedule)
    timesteps = schedule.t_to_timestep(PUBLISHED_NFE20_TIMES)

    # One row per integer model input time 1000 * max(t - 1/1000, 0) from 0 to 999.
    assert len(alpha) == 1000
    np.testing.assert_allclose(alpha[[0, 500, 999]], schedule.alpha(np.array([1e-3, 0.501, 1.0])))
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0)
    assert schedule.t_to_timestep(np.array(1e-4)) == 0.0
    assert timesteps[0] == pytest.approx(999.0)
    assert timesteps[-1] == 0.0
    assert np.all((timesteps >= 0) & (timesteps <= 999))


def test_unknown_schedule_preset():
    data = {**get_preset("digits").to_dict(), "schedule": "cosine-ish"}

    with pytest.raises(CalibexportError, match="invalid schedule 'cosine-ish'.*published-linear"):
        ModelSpec.from_dict(data)
