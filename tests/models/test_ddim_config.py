"""spec_from_ddim_yaml on YAML files in the DDIM repository's config layout."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from calibexport.errors import CalibexportError
from calibexport.models import get_preset, spec_from_ddim_yaml
from calibexport.models.ddim_config import MODEL_TYPE_EXTRA_KEY

# The values of the DDIM CelebA 64x64 config, in its layout.
CELEBA_CONFIG = {
    "data": {"dataset": "CELEBA", "image_size": 64, "channels": 3, "logit_transform": False,
             "uniform_dequantization": False, "random_flip": True},
    "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
              "dropout": 0.1, "var_type": "fixedlarge", "ema_rate": 0.9999, "ema": True,
              "resamp_with_conv": True},
    "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                  "num_diffusion_timesteps": 1000},
    "training": {"batch_size": 128, "n_epochs": 10000},
    "sampling": {"batch_size": 32},
    "optim": {"lr": 0.0002},
}


def write_config(tmp_path: Path, config: dict, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def edited(section: str, **changes) -> dict:
    config = copy.deepcopy(CELEBA_CONFIG)
    config[section].update(changes)
    return config


def test_celeba_config_matches_preset(tmp_path):
    spec = spec_from_ddim_yaml(write_config(tmp_path, CELEBA_CONFIG))

    assert spec.to_dict() == get_preset("celeba64").to_dict()


def test_exponent_without_dot(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string.
    path = tmp_path / "config.yml"
    text = yaml.safe_dump(CELEBA_CONFIG).replace("beta_start: 0.0001", "beta_start: 1e-4")
    assert "beta_start: 1e-4" in text
    path.write_text(text)

    spec = spec_from_ddim_yaml(path)

    assert spec.schedule["beta_start"] == 1e-4


@pytest.mark.parametrize("schedule", ["quad", "cosine", "const", "jsd", "sigmoid"])
def test_rejects_other_beta_schedules(tmp_path, schedule):
    path = write_config(tmp_path, edited("diffusion", beta_schedule=schedule))

    with pytest.raises(CalibexportError, match=f"beta_schedule '{schedule}' is not supported"):
        spec_from_ddim_yaml(path)


def test_rejects_invalid_betas(tmp_path):
    path = write_config(tmp_path, edited("diffusion", beta_end=1.5))

    with pytest.raises(CalibexportError, match="invalid diffusion schedule"):
        spec_from_ddim_yaml(path)


def test_missing_model_keys(tmp_path):
    config = copy.deepcopy(CELEBA_CONFIG)
    del config["model"]["ch"]
    del config["model"]["resamp_with_conv"]

    with pytest.raises(CalibexportError, match=r"missing keys \['ch', 'resamp_with_conv'\]"):
        spec_from_ddim_yaml(write_config(tmp_path, config))


def test_missing_section(tmp_path):
    config = {key: value for key, value in CELEBA_CONFIG.items() if key != "diffusion"}

    with pytest.raises(CalibexportError, match="missing or invalid 'diffusion' section"):
        spec_from_ddim_yaml(write_config(tmp_path, config))


def test_wrong_value_type(tmp_path):
    path = write_config(tmp_path, edited("model", ch="128"))

    with pytest.raises(CalibexportError, match="model.ch must be an integer, got '128'"):
        spec_from_ddim_yaml(path)


def test_channels_disagree(tmp_path):
    path = write_config(tmp_path, edited("data", channels=1))

    with pytest.raises(CalibexportError, match="data.channels is 1 but model.in_channels is 3"):
        spec_from_ddim_yaml(path)


def test_out_ch_must_equal_in_channels(tmp_path):
    path = write_config(tmp_path, edited("model", out_ch=6))

    with pytest.raises(CalibexportError, match="model.out_ch is 6"):
        spec_from_ddim_yaml(path)


def test_unknown_model_type(tmp_path):
    path = write_config(tmp_path, edited("model", type="transformer"))

    with pytest.raises(CalibexportError, match="model.type 'transformer' is not supported"):
        spec_from_ddim_yaml(path)


def test_bayesian_type_recorded(tmp_path):
    spec = spec_from_ddim_yaml(write_config(tmp_path, edited("model", type="bayesian")))

    assert spec.unet.extra == {MODEL_TYPE_EXTRA_KEY: "bayesian"}


def test_invalid_architecture_names_file(tmp_path):
    path = write_config(tmp_path, edited("model", ch=100))

    with pytest.raises(CalibexportError, match=r"config\.yml: ch must be a multiple of 32"):
        spec_from_ddim_yaml(path)


def test_python_tags_not_constructed(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "config.yml"
    path.write_text(f"data: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")

    with pytest.raises(CalibexportError, match="Python object tags"):
        spec_from_ddim_yaml(path)
    assert not marker.exists()


def test_not_a_mapping(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("- 1\n- 2\n")

    with pytest.raises(CalibexportError, match="contains a list, not a mapping"):
        spec_from_ddim_yaml(path)


def test_truncated_yaml(tmp_path):
    path = tmp_path / "config.yml"
    text = yaml.safe_dump(CELEBA_CONFIG, default_flow_style=True)
    path.write_text(text[: len(text) // 2])

    with pytest.raises(CalibexportError, match=r"could not parse YAML config .*config\.yml"):
        spec_from_ddim_yaml(path)


def test_config_not_found(tmp_path):
    with pytest.raises(CalibexportError, match="config file not found"):
        spec_from_ddim_yaml(tmp_path / "absent.yml")
