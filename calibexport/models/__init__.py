"""Network architectures, presets and checkpoint loaders (torch)."""

from calibexport.models.ddim_config import spec_from_ddim_yaml
from calibexport.models.loaders import LoadedModel, load_model, load_spec
from calibexport.models.presets import PRESETS, ModelSpec, get_preset
from calibexport.models.unet import DDPMUNet, UNetConfig
from calibexport.models.weights_hash import weights_sha256

__all__ = [
    "PRESETS",
    "DDPMUNet",
    "LoadedModel",
    "ModelSpec",
    "UNetConfig",
    "get_preset",
    "load_model",
    "load_spec",
    "spec_from_ddim_yaml",
    "weights_sha256",
]
