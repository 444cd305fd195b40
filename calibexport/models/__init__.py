"""Network architectures, presets and checkpoint loaders (torch)."""

from calibexport.models.presets import PRESETS, ModelSpec, get_preset
from calibexport.models.unet import DDPMUNet, UNetConfig

__all__ = ["PRESETS", "DDPMUNet", "ModelSpec", "UNetConfig", "get_preset"]
