"""diffusers ``UNet2DModel`` directories as noise-prediction networks (optional dependency).

A model directory is either a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``)
or a ``UNet2DModel`` folder written by ``save_pretrained`` (``config.json`` and the weights). The
network is loaded with diffusers itself from local files only, so its own timestep embedding,
including ``flip_sin_to_cos`` and ``freq_shift``, runs unchanged. The noise schedule and the
prediction type come from ``--config`` (a diffusers ``scheduler_config.json`` or a calibexport
JSON with ``schedule`` and ``prediction_type``), else from the pipeline's
``scheduler/scheduler_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibexport.errors import CalibexportError
from calibexport.models.presets import ModelSpec
from calibexport.runtime.prediction import DIFFUSERS_PREDICTION_TYPES, check_prediction_type

logger = logging.getLogger(__name__)

UNET_CLASS = "UNet2DModel"
SCHEDULER_CONFIG = "scheduler_config.json"
_INSTALL_HINT = "install it with `pip install calibexport[diffusers]` (or `pip install diffusers`)"


def find_unet_directory(path: Path) -> Path | None:
    """Return the ``UNet2DModel`` folder of a pipeline or model folder, or None for other paths."""
    if not path.is_dir():
        return None
    for candidate in (path, path / "unet"):
        config_path = candidate / "config.json"
        if config_path.is_file() and _read_json(config_path).get("_class_name") == UNET_CLASS:
            return candidate
    return None


def load_diffusers_unet(path: Path,
                        config: str | Path | None) -> tuple[torch.nn.Module, ModelSpec]:
    """Load the UNet of ``path`` (see ``find_unet_directory``) and return (network, spec)."""
    unet_dir = find_unet_directory(path)
    if unet_dir is None:
        raise CalibexportError(
            f"{path} is not a diffusers {UNET_CLASS} folder: no config.json with _class_name "
            f"{UNET_CLASS!r} in it or in its unet/ folder."
        )
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:
        raise CalibexportError(
            f"{path} is a diffusers model folder, but diffusers is not installed; "
            f"{_INSTALL_HINT}."
        ) from exc

    unet_config = _read_json(unet_dir / "config.json")
    _check_supported(unet_config, unet_dir)
    schedule, prediction_type, origin = _schedule_and_prediction(path, unet_dir, config)
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True,
                                           low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises OSError, ValueError and others
        raise CalibexportError(
            f"diffusers could not load {unet_dir}: {type(exc).__name__}: {exc}"
        ) from exc
    module = DiffusersUNet(unet.float().eval(), int(unet_config.get("in_channels", 3)))
    spec = ModelSpec(
        unet=None, schedule=schedule, prediction_type=prediction_type,
        architecture="diffusers_unet2d", shape=_image_shape(unet_config),
        options={
            "class_name": UNET_CLASS,
            "flip_sin_to_cos": bool(unet_config.get("flip_sin_to_cos", True)),
            "freq_shift": float(unet_config.get("freq_shift", 0)),
            "schedule_from": origin,
        },
    )
    logger.info("Loaded diffusers %s from %s (flip_sin_to_cos %s, freq_shift %g, %s).",
                UNET_CLASS, unet_dir, spec.options["flip_sin_to_cos"], spec.options["freq_shift"],
                prediction_type)
    return module.eval(), spec


class DiffusersUNet(torch.nn.Module):
    """``UNet2DModel`` called as ``network(x, timestep)`` returning the prediction tensor.

    A UNet with twice the input channels (a learned variance) returns its first half only.
    """

    def __init__(self, unet: Any, in_channels: int) -> None:
        super().__init__()
        self.unet = unet
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        output = self.unet(x, timestep, return_dict=False)[0]
        return output[:, : self.in_channels]


def diffusers_schedule(scheduler_config: dict[str, Any], origin: str) -> dict[str, Any]:
    """Return calibexport's schedule spec for a diffusers DDPM/DDIM-style scheduler config."""
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    kind = scheduler_config.get("beta_schedule", "linear")
    start = float(scheduler_config.get("beta_start", 0.0001))
    end = float(scheduler_config.get("beta_end", 0.02))
    if scheduler_config.get("rescale_betas_zero_snr"):
        raise CalibexportError(
            f"{origin}: rescale_betas_zero_snr gives alpha = 0 at the last step, which a VP "
            "schedule with 0 < beta < 1 cannot represent."
        )
    if scheduler_config.get("trained_betas") is not None:
        return {"kind": "discrete", "betas": [float(b) for b in scheduler_config["trained_betas"]]}
    if kind == "linear":
        return {"kind": "discrete", "beta_schedule": "linear", "beta_start": start,
                "beta_end": end, "num_timesteps": steps}
    if kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _cosine_betas(steps)
    else:
        raise CalibexportError(
            f"{origin}: beta_schedule {kind!r} is not supported; valid: linear, scaled_linear, "
            "squaredcos_cap_v2, or trained_betas."
        )
    return {"kind": "discrete", "betas": betas.tolist()}


def _cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
                     for i in range(steps)], dtype=np.float64)


def _schedule_and_prediction(path: Path, unet_dir: Path,
                             config: str | Path | None) -> tuple[dict[str, Any], str, str]:
    candidates = [Path(config)] if config is not None else [
        path / "scheduler" / SCHEDULER_CONFIG, unet_dir.parent / "scheduler" / SCHEDULER_CONFIG,
        unet_dir / SCHEDULER_CONFIG,
    ]
    for candidate in candidates:
        if candidate.is_file():
            data = _read_json(candidate)
            if "schedule" in data:  # a calibexport model config
                prediction = check_prediction_type(data.get("prediction_type", "eps"))
                return dict(data["schedule"]), prediction, str(candidate)
            raw = data.get("prediction_type", "epsilon")
            if raw not in DIFFUSERS_PREDICTION_TYPES:
                raise CalibexportError(
                    f"{candidate}: prediction_type {raw!r} is not supported; valid: "
                    f"{', '.join(DIFFUSERS_PREDICTION_TYPES)}."
                )
            schedule = diffusers_schedule(data, str(candidate))
            return schedule, DIFFUSERS_PREDICTION_TYPES[raw], str(candidate)
    if config is not None:
        raise CalibexportError(f"config {config} not found.")
    raise CalibexportError(
        f"no noise schedule for {path}: no scheduler/{SCHEDULER_CONFIG} beside the UNet. Pass "
        "--config with the pipeline's scheduler_config.json or a JSON file with 'schedule' and "
        "'prediction_type'."
    )


def _check_supported(unet_config: dict[str, Any], unet_dir: Path) -> None:
    if unet_config.get("time_embedding_type", "positional") != "positional":
        raise CalibexportError(
            f"{unet_dir}: time_embedding_type {unet_config['time_embedding_type']!r} is not "
            "supported; calibexport handles networks that take the integer-step timestep "
            "(time_embedding_type 'positional')."
        )
    if unet_config.get("class_embed_type") or unet_config.get("num_class_embeds"):
        raise CalibexportError(
            f"{unet_dir}: class-conditional UNets need class labels, which calibexport does not "
            "pass; use an unconditional model."
        )
    channels = int(unet_config.get("in_channels", 3))
    if int(unet_config.get("out_channels", 3)) not in (channels, 2 * channels):
        raise CalibexportError(
            f"{unet_dir}: out_channels {unet_config.get('out_channels')} is neither in_channels "
            f"({channels}) nor twice it (a learned variance)."
        )


def _image_shape(unet_config: dict[str, Any]) -> tuple[int, int, int]:
    size = unet_config.get("sample_size")
    sizes = [size, size] if isinstance(size, int) else list(size or [])
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise CalibexportError(
            f"sample_size {size!r} is not one square size; calibexport handles H == W images."
        )
    return int(unet_config.get("in_channels", 3)), int(sizes[0]), int(sizes[1])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibexportError(f"could not read JSON file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CalibexportError(f"{path} contains a JSON {type(data).__name__}, not an object.")
    return data
