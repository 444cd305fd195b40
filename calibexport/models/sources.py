"""Networks from sources other than a checkpoint of calibexport's UNet.

``load_other_source`` recognises a ``package.module:function`` factory reference, a diffusers
``UNet2DModel`` folder and a TorchScript archive, and returns None for every other path, which
``calibexport.models.loaders.load_model`` then reads as a UNet checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from calibexport.errors import CalibexportError
from calibexport.models.factory import is_factory_reference, load_factory_network
from calibexport.models.presets import ModelSpec
from calibexport.models.weights_hash import weights_sha256

if TYPE_CHECKING:
    import torch

    from calibexport.models.loaders import LoadedModel

logger = logging.getLogger(__name__)

#: Source formats besides the checkpoint formats of ``calibexport.models.loaders.FORMATS``.
SOURCE_FORMATS = ("factory", "diffusers", "torchscript")


def load_other_source(path: str | Path, config: str | Path | None,
                      weights: str) -> LoadedModel | None:
    """Load ``path`` if it is a factory reference, a diffusers folder or a TorchScript archive."""
    from calibexport.models.diffusers_unet import find_unet_directory, load_diffusers_unet
    from calibexport.models.loaders import load_spec
    from calibexport.models.torchscript import is_torchscript_archive, load_torchscript

    start = time.perf_counter()
    text = str(path)
    path = Path(path)
    if is_factory_reference(text) and not path.exists():
        spec = load_spec(config) if config is not None else None
        module, spec = load_factory_network(text, spec)
        return _loaded(module, spec, "factory", text, config, weights, start)
    if find_unet_directory(path) is not None:
        module, spec = load_diffusers_unet(path, config)
        return _loaded(module, spec, "diffusers", str(path), config, weights, start)
    if is_torchscript_archive(path):
        spec = _config_spec(path, config)
        module = load_torchscript(path)
        return _loaded(module, spec, "torchscript", str(path), config, weights, start)
    return None


def _config_spec(path: Path, config: str | Path | None) -> ModelSpec:
    """Return the spec from ``config`` or from NAME.json beside the archive ``path``."""
    from calibexport.models.loaders import load_spec

    if config is not None:
        return load_spec(config)
    beside = path.with_suffix(".json")
    if beside.is_file():
        return load_spec(beside)
    raise CalibexportError(
        f"no model config for {path}: the archive stores no image shape, schedule or prediction "
        f"type. Write {beside.name} beside it, or pass --config, with for example "
        '{"architecture": "torchscript", "image_shape": [3, 32, 32], "prediction_type": "eps", '
        '"schedule": {"kind": "discrete", "beta_schedule": "linear", "beta_start": 0.0001, '
        '"beta_end": 0.02, "num_timesteps": 1000}}.'
    )


def _loaded(module: torch.nn.Module, spec: ModelSpec, source_format: str, path: str,
            config: str | Path | None, weights: str, start: float) -> LoadedModel:
    from calibexport.models.loaders import UNLABELED, LoadedModel

    digest = weights_sha256(module.state_dict())
    source = {
        "path": path,
        "format": source_format,
        "weights": weights,
        "weights_loaded": UNLABELED,
        "config": None if config is None else str(config),
        "config_kind": source_format,
    }
    logger.info("Loaded %s network %s: %d parameters, sha256 %s (%.1fs). Done.", source_format,
                path, sum(p.numel() for p in module.parameters()), digest[:12],
                time.perf_counter() - start)
    return LoadedModel(module=module, spec=spec, weights_sha256=digest, source=source)
