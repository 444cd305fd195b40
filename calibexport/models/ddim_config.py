"""Read a model config in the YAML layout of the DDIM repository (Song et al., 2021) as a ModelSpec.

The layout has three sections that matter here::

    data:      {image_size, channels}
    model:     {type, in_channels, out_ch, ch, ch_mult, num_res_blocks, attn_resolutions,
                dropout, resamp_with_conv, var_type, ema_rate, ema}
    diffusion: {beta_schedule, beta_start, beta_end, num_diffusion_timesteps}

``var_type``, ``ema_rate`` and ``ema`` only affect training and DDPM sampling, so they are read
for validation of the layout but not stored. Other sections (``training``, ``sampling``,
``optim``) are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from calibexport.errors import CalibexportError
from calibexport.models.presets import ModelSpec
from calibexport.models.unet import UNetConfig
from calibexport.runtime.schedule import schedule_from_spec

logger = logging.getLogger(__name__)

# "bayesian" models carry one extra parameter, ``logvar`` (a learned log-variance per timestep),
# that the noise prediction does not use. The loader drops it when this type is recorded.
MODEL_TYPES = ("simple", "bayesian")
MODEL_TYPE_EXTRA_KEY = "ddim_model_type"
BETA_SCHEDULES = ("linear",)

_REQUIRED_MODEL_KEYS = (
    "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
    "resamp_with_conv",
)
_REQUIRED_DIFFUSION_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_diffusion_timesteps")


def spec_from_ddim_yaml(path: str | Path) -> ModelSpec:
    """Read a DDIM-style YAML config file (with ``yaml.safe_load``) into a ModelSpec."""
    path = Path(path)
    config = _read_yaml(path)
    return spec_from_ddim_dict(config, source=str(path))


def spec_from_ddim_dict(config: Mapping[str, Any], source: str = "DDIM config") -> ModelSpec:
    """Convert an already parsed DDIM-style config to a ModelSpec; ``source`` names it in errors."""
    data = _section(config, "data", source)
    model = _section(config, "model", source)
    diffusion = _section(config, "diffusion", source)
    _require(data, ("image_size",), "data", source)
    _require(model, _REQUIRED_MODEL_KEYS, "model", source)
    _require(diffusion, _REQUIRED_DIFFUSION_KEYS, "diffusion", source)

    model_type = model.get("type", "simple")
    if model_type not in MODEL_TYPES:
        raise CalibexportError(
            f"{source}: model.type {model_type!r} is not supported; valid types: "
            f"{', '.join(MODEL_TYPES)} (the DDPM/DDIM UNet)."
        )
    in_channels = _as_int(model["in_channels"], "model.in_channels", source)
    out_ch = _as_int(model["out_ch"], "model.out_ch", source)
    if "channels" in data and _as_int(data["channels"], "data.channels", source) != in_channels:
        raise CalibexportError(
            f"{source}: data.channels is {data['channels']} but model.in_channels is "
            f"{in_channels}; make the two agree."
        )
    if out_ch != in_channels:
        raise CalibexportError(
            f"{source}: model.out_ch is {out_ch} but model.in_channels is {in_channels}; a noise "
            "prediction has the shape of its input, so only out_ch == in_channels is supported."
        )

    try:
        unet = UNetConfig(
            resolution=_as_int(data["image_size"], "data.image_size", source),
            in_channels=in_channels,
            out_ch=out_ch,
            ch=_as_int(model["ch"], "model.ch", source),
            ch_mult=_as_int_list(model["ch_mult"], "model.ch_mult", source),
            num_res_blocks=_as_int(model["num_res_blocks"], "model.num_res_blocks", source),
            attn_resolutions=_as_int_list(
                model["attn_resolutions"], "model.attn_resolutions", source
            ),
            dropout=_as_float(model["dropout"], "model.dropout", source),
            resamp_with_conv=_as_bool(model["resamp_with_conv"], "model.resamp_with_conv", source),
            extra={MODEL_TYPE_EXTRA_KEY: model_type} if model_type != "simple" else {},
        )
    except CalibexportError as err:
        raise CalibexportError(f"{source}: {err}") from err

    ignored = sorted(set(model) - set(_REQUIRED_MODEL_KEYS) - {"type"})
    if ignored:
        logger.debug("%s: model keys not used by the network: %s", source, ignored)
    return ModelSpec(unet=unet, schedule=_schedule_spec(diffusion, source))


def _schedule_spec(diffusion: Mapping[str, Any], source: str) -> dict[str, Any]:
    beta_schedule = diffusion["beta_schedule"]
    if beta_schedule not in BETA_SCHEDULES:
        raise CalibexportError(
            f"{source}: diffusion.beta_schedule {beta_schedule!r} is not supported; supported: "
            f"{', '.join(BETA_SCHEDULES)}. Write the betas into a calibexport JSON config "
            "(schedule: {kind: discrete, betas: [...]}) to use another schedule."
        )
    spec = {
        "kind": "discrete",
        "beta_schedule": "linear",
        "beta_start": _as_float(diffusion["beta_start"], "diffusion.beta_start", source),
        "beta_end": _as_float(diffusion["beta_end"], "diffusion.beta_end", source),
        "num_timesteps": _as_int(
            diffusion["num_diffusion_timesteps"], "diffusion.num_diffusion_timesteps", source
        ),
    }
    try:
        schedule_from_spec(spec)
    except CalibexportError as err:
        raise CalibexportError(f"{source}: invalid diffusion schedule: {err}") from err
    return spec


def _read_yaml(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise CalibexportError(f"config file not found: {path}.")
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        hint = ""
        if "python/" in str(err):
            # DDIM writes the config.yml in its log folder with Python object tags.
            hint = (
                " The file contains Python object tags, which calibexport does not construct;"
                " use the plain config from the DDIM repository's configs folder instead."
            )
        raise CalibexportError(f"could not parse YAML config {path}: {err}.{hint}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CalibexportError(f"could not read YAML config {path}: {err}") from err
    if not isinstance(config, Mapping):
        raise CalibexportError(
            f"YAML config {path} contains a {type(config).__name__}, not a mapping with "
            "'data', 'model' and 'diffusion' sections."
        )
    return config


def _section(config: Mapping[str, Any], name: str, source: str) -> Mapping[str, Any]:
    section = config.get(name)
    if not isinstance(section, Mapping):
        raise CalibexportError(
            f"{source}: missing or invalid '{name}' section (top-level keys seen: "
            f"{sorted(map(str, config))}); a DDIM config has 'data', 'model' and 'diffusion'."
        )
    return section


def _require(section: Mapping[str, Any], keys: tuple[str, ...], name: str, source: str) -> None:
    missing = [key for key in keys if key not in section]
    if missing:
        raise CalibexportError(
            f"{source}: the '{name}' section is missing keys {missing}; "
            f"keys seen: {sorted(map(str, section))}."
        )


def _as_int(value: Any, where: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CalibexportError(f"{source}: {where} must be an integer, got {value!r}.")
    return value


def _as_float(value: Any, where: str, source: str) -> float:
    # PyYAML reads exponent forms without a dot (1e-4) as strings, so those are parsed here.
    if isinstance(value, bool):
        raise CalibexportError(f"{source}: {where} must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CalibexportError(f"{source}: {where} must be a number, got {value!r}.") from None


def _as_bool(value: Any, where: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise CalibexportError(f"{source}: {where} must be true or false, got {value!r}.")
    return value


def _as_int_list(value: Any, where: str, source: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise CalibexportError(f"{source}: {where} must be a list of integers, got {value!r}.")
    return tuple(_as_int(item, where, source) for item in value)
