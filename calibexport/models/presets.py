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

#: Named noise schedules, usable as ``"schedule": NAME`` in a model config. ``published-linear``
#: is the setting of the published calibrated DPM-Solver runs: the continuous linear VP schedule
#: (beta_0 = 0.1, beta_1 = 20), model input time 1000 * max(t - 1/1000, 0), and sampling down
#: to t_end = 1e-4. Its eta table has one row per integer model input time 0..999.
SCHEDULE_PRESETS: dict[str, dict[str, Any]] = {
    "published-linear": {
        "kind": "linear",
        "beta_0": 0.1,
        "beta_1": 20.0,
        "timestep_scale": 1000.0,
        "t_shift": 0.001,
        "t_end": 1e-4,
        "preset": "published-linear",
    },
}


def resolve_schedule(schedule: str | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of a schedule spec; a string names an entry of ``SCHEDULE_PRESETS``."""
    if isinstance(schedule, dict):
        return dict(schedule)
    if isinstance(schedule, str) and schedule in SCHEDULE_PRESETS:
        return dict(SCHEDULE_PRESETS[schedule])
    raise CalibexportError(
        f"invalid schedule {schedule!r}: give a schedule object or one of the schedule presets "
        f"{', '.join(sorted(SCHEDULE_PRESETS))}."
    )


#: ``ddpm_unet`` is calibexport's own UNet. The others describe networks built elsewhere: a
#: diffusers ``UNet2DModel`` directory, a TorchScript archive, or a ``module:function`` factory.
ARCHITECTURES = ("ddpm_unet", "diffusers_unet2d", "torchscript", "factory")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a network and interpret its output.

    ``unet`` describes a ``ddpm_unet``; other architectures leave it None and give their
    ``shape`` (C, H, W) instead. ``options`` contains architecture-specific settings, such as the
    ``factory`` reference and its ``factory_kwargs``.
    """

    unet: UNetConfig | None
    schedule: dict[str, Any] = field(default_factory=lambda: dict(LINEAR_DISCRETE_1000))
    prediction_type: str = "eps"
    architecture: str = "ddpm_unet"
    shape: tuple[int, int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the network's input and output images."""
        if self.unet is not None:
            return (self.unet.in_channels, self.unet.resolution, self.unet.resolution)
        assert self.shape is not None, "a ModelSpec without a UNet config needs a shape"
        return self.shape

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "architecture": self.architecture,
            "prediction_type": self.prediction_type,
            "schedule": dict(self.schedule),
        }
        if self.unet is not None:
            data["unet"] = self.unet.to_dict()
        else:
            data["image_shape"] = list(self.image_shape)
        if self.options:
            data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        from calibexport.runtime.prediction import check_prediction_type

        architecture = data.get("architecture", "ddpm_unet")
        if architecture not in ARCHITECTURES:
            raise CalibexportError(
                f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}."
            )
        if architecture == "ddpm_unet" and "unet" not in data:
            raise CalibexportError(
                f"model config has no 'unet' section (keys seen: {sorted(data)}); "
                "write it as calibexport's JSON config or pass a preset name."
            )
        if architecture != "ddpm_unet" and "image_shape" not in data:
            raise CalibexportError(
                f"a model config of architecture {architecture!r} needs 'image_shape': [C, H, W] "
                f"(keys seen: {sorted(data)})."
            )
        prediction_type = check_prediction_type(data.get("prediction_type", "eps"))
        return cls(
            unet=UNetConfig.from_dict(data["unet"]) if architecture == "ddpm_unet" else None,
            schedule=resolve_schedule(data.get("schedule", LINEAR_DISCRETE_1000)),
            prediction_type=prediction_type,
            architecture=architecture,
            shape=None if architecture == "ddpm_unet" else _check_shape(data["image_shape"]),
            options=dict(data.get("options", {})),
        )


def _check_shape(shape: Any) -> tuple[int, int, int]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise CalibexportError(f"image_shape must be [C, H, W] with positive sizes, got {shape!r}.")
    if dims[1] != dims[2]:
        raise CalibexportError(
            f"image_shape {list(dims)} is not square; calibexport handles H == W images only."
        )
    return dims  # type: ignore[return-value]


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
