"""Named model configurations: the architecture and the noise schedule each was trained with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from calibexport.errors import CalibexportError
from calibexport.models.unet import UNetConfig

LINEAR_DISCRETE_1000 = {
    "kind": "discrete",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_timesteps": 1000,
}


@dataclass
class ModelSpec:
    """Everything needed to rebuild a network and interpret its output."""

    unet: UNetConfig
    schedule: dict[str, Any] = field(default_factory=lambda: dict(LINEAR_DISCRETE_1000))
    prediction_type: str = "eps"
    architecture: str = "ddpm_unet"

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "prediction_type": self.prediction_type,
            "schedule": dict(self.schedule),
            "unet": self.unet.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if "unet" not in data:
            raise CalibexportError(
                f"model config has no 'unet' section (keys seen: {sorted(data)}); "
                "write it as calibexport's JSON config or pass a preset name."
            )
        architecture = data.get("architecture", "ddpm_unet")
        if architecture != "ddpm_unet":
            raise CalibexportError(f"unknown architecture {architecture!r}; valid: 'ddpm_unet'.")
        prediction_type = data.get("prediction_type", "eps")
        if prediction_type != "eps":
            raise CalibexportError(
                f"prediction_type {prediction_type!r} is not supported yet; only 'eps' networks are."
            )
        return cls(
            unet=UNetConfig.from_dict(data["unet"]),
            schedule=dict(data.get("schedule", LINEAR_DISCRETE_1000)),
            prediction_type=prediction_type,
            architecture=architecture,
        )


PRESETS: dict[str, ModelSpec] = {
    # DDIM CelebA 64x64: 78,700,803 parameters in 390 tensors.
    "celeba64": ModelSpec(
        UNetConfig(
            resolution=64,
            ch=128,
            ch_mult=(1, 2, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            dropout=0.1,
        )
    ),
    # DDPM CIFAR-10: 35,746,307 parameters in 328 tensors.
    "cifar10": ModelSpec(
        UNetConfig(
            resolution=32,
            ch=128,
            ch_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attn_resolutions=(16,),
            dropout=0.1,
        )
    ),
    # The bundled demo: scikit-learn's 8x8 handwritten digits upsampled to 16x16, one channel.
    "digits": ModelSpec(
        UNetConfig(
            resolution=16,
            in_channels=1,
            out_ch=1,
            ch=32,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            attn_resolutions=(8,),
            dropout=0.0,
        )
    ),
}


def get_preset(name: str) -> ModelSpec:
    try:
        spec = PRESETS[name]
    except KeyError:
        raise CalibexportError(
            f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}."
        ) from None
    return ModelSpec.from_dict(spec.to_dict())
