"""calibexport's own checkpoint format: safetensors weights beside a JSON model config.

``NAME.safetensors`` contains the tensors and ``NAME.json`` the ``ModelSpec``. Neither file can
execute code when loaded, so the pair is safe to read from untrusted sources.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from calibexport.models.presets import ModelSpec


def config_path_for(weights_path: Path) -> Path:
    return weights_path.with_suffix(".json")


def save_native(
    weights_path: str | Path,
    state_dict: dict[str, torch.Tensor],
    spec: ModelSpec,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write NAME.safetensors and NAME.json, each through a temporary file and a rename."""
    from safetensors.torch import save_file

    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp_weights = weights_path.with_name(weights_path.name + ".tmp")
    save_file(tensors, str(tmp_weights))

    config = spec.to_dict()
    if extra:
        config["training"] = extra
    config_path = config_path_for(weights_path)
    tmp_config = config_path.with_name(config_path.name + ".tmp")
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")

    os.replace(tmp_weights, weights_path)
    os.replace(tmp_config, config_path)
