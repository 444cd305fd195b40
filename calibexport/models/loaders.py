"""Load a pretrained noise-prediction network from a checkpoint file.

Three checkpoint formats are read:

* ``native``: calibexport's ``NAME.safetensors`` with its ``ModelSpec`` in ``NAME.json``.
* ``ddim_list``: the DDIM repository's ``ckpt.pth``, a torch-saved list
  ``[model_state, optimizer_state, epoch, step, ema_state]``. ``model_state`` keys carry the
  ``module.`` prefix of ``torch.nn.DataParallel``. ``ema_state`` is present only when the model
  was trained with EMA.
* ``state_dict``: a torch-saved dict of tensors, or a dict whose ``ema``, ``model`` or
  ``state_dict`` entry is one.

Torch files are read with ``weights_only=True``, so a file that needs arbitrary unpickling
(which can execute code) is rejected instead of loaded.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibexport.errors import CalibexportError
from calibexport.models.ddim_config import MODEL_TYPE_EXTRA_KEY, spec_from_ddim_yaml
from calibexport.models.presets import PRESETS, ModelSpec, get_preset
from calibexport.models.weights_hash import weights_sha256

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMATS = ("native", "ddim_list", "state_dict")
WEIGHTS_CHOICES = ("ema", "model")
# Recorded as the weights choice when a file contains one set of weights without an EMA/model label.
UNLABELED = "unlabeled"

_MODULE_PREFIX = "module."
_CONFIG_SUFFIXES = (".json", ".yml", ".yaml")
_MAX_KEYS_SHOWN = 5
_WEIGHTS_ONLY_FAILURE = "Weights only load failed"


@dataclass
class LoadedModel:
    """A network ready for inference, with the identity of the weights it was loaded from.

    ``module`` is in eval mode with float32 parameters on the CPU. ``source`` records the
    checkpoint ``path``, its ``format`` (one of ``FORMATS``) and the ``weights`` choice passed
    to ``load_model``. ``weights_loaded`` is ``ema``, ``model``, or ``unlabeled`` for a file with
    one set of weights. ``config`` and ``config_kind`` (``preset``, ``json`` or ``ddim_yaml``)
    name where the architecture came from. Passing ``path``, ``config`` and ``weights`` back to
    ``load_model`` loads the same network.
    """

    module: torch.nn.Module
    spec: ModelSpec
    weights_sha256: str
    source: dict[str, Any]


def load_model(path: str | Path, *, config: str | Path | None = None,
               weights: str = "ema") -> LoadedModel:
    """Load a checkpoint in any of ``FORMATS`` into a float32 ``DDPMUNet`` on the CPU.

    ``config`` is a preset name, a DDIM-style YAML file or a calibexport JSON config. Without it,
    the config beside the checkpoint (NAME.json, NAME.yml or NAME.yaml) is used. ``weights``
    selects the EMA or the raw training weights where the file labels them. A file with one
    unlabeled set of weights (native, a bare state_dict) loads that set, with a warning if
    ``weights`` is "model".
    """
    start = time.perf_counter()
    path = Path(path)
    if weights not in WEIGHTS_CHOICES:
        raise CalibexportError(
            f"invalid weights choice {weights!r}; valid choices: 'ema' (the exponential moving "
            "average of the training weights, the default) or 'model' (the training weights)."
        )
    from calibexport.models.sources import load_other_source

    other = load_other_source(path, config, weights)
    if other is not None:
        return other
    _check_checkpoint_path(path)
    spec, config_source = _resolve_config(path, config)

    logger.info("Loading %s (weights %s, config %s)", path, weights, config_source["config"])
    if path.suffix == ".safetensors":
        checkpoint_format, state, weights_used = "native", _read_safetensors(path), UNLABELED
    else:
        checkpoint_format, state, weights_used = _select_weights(_read_torch_file(path), path,
                                                                 weights)
    if weights_used == UNLABELED and weights != "ema":
        logger.warning("%s contains one set of weights without an EMA/model label; loaded it as is "
                       "although --weights %s was requested.", path, weights)

    module = _build_module(spec, state, path, config_source["config"])
    digest = weights_sha256(module.state_dict())
    source = {
        "path": str(path),
        "format": checkpoint_format,
        "weights": weights,
        "weights_loaded": weights_used,
        **config_source,
    }
    num_params = sum(p.numel() for p in module.parameters())
    logger.info("Loaded %s checkpoint %s: %s weights, %d parameters in %d tensors, sha256 %s "
                "(%.1fs). Done.", checkpoint_format, path, weights_used, num_params,
                len(module.state_dict()), digest[:12], time.perf_counter() - start)
    return LoadedModel(module=module, spec=spec, weights_sha256=digest, source=source)


def load_spec(config: str | Path) -> ModelSpec:
    """Read a model config: a preset name, a DDIM-style YAML file or a calibexport JSON file."""
    return _spec_from_config_option(config)[0]


def _check_checkpoint_path(path: Path) -> None:
    if path.is_dir():
        raise CalibexportError(
            f"checkpoint path {path} is a directory; pass the checkpoint file inside it "
            "(for a DDIM log folder, ckpt.pth)."
        )
    if not path.is_file():
        raise CalibexportError(
            f"checkpoint not found: {path}; pass a .safetensors file with its .json config, "
            "a DDIM ckpt.pth or a torch-saved state_dict."
        )


# Config resolution ------------------------------------------------------------------------------


def _resolve_config(checkpoint: Path,
                    config: str | Path | None) -> tuple[ModelSpec, dict[str, str]]:
    if config is not None:
        spec, kind, origin = _spec_from_config_option(config)
    else:
        found = [checkpoint.with_suffix(s) for s in _CONFIG_SUFFIXES]
        found = [candidate for candidate in found if candidate.is_file()]
        if not found:
            raise CalibexportError(
                f"no model config for checkpoint {checkpoint}: none of "
                f"{', '.join(checkpoint.with_suffix(s).name for s in _CONFIG_SUFFIXES)} exists "
                "beside it. Pass --config with a preset name (valid presets: "
                f"{', '.join(sorted(PRESETS))}), a DDIM-style YAML file or a calibexport JSON "
                "config that describes the network."
            )
        if len(found) > 1:
            raise CalibexportError(
                f"several model configs beside checkpoint {checkpoint}: "
                f"{', '.join(str(p) for p in found)}; pass --config to choose one."
            )
        spec, kind, origin = _spec_from_file(found[0])
    return spec, {"config": origin, "config_kind": kind}


def _spec_from_config_option(config: str | Path) -> tuple[ModelSpec, str, str]:
    """Return (spec, kind, origin) where kind is 'preset', 'json' or 'ddim_yaml'."""
    if isinstance(config, str) and config in PRESETS:
        return get_preset(config), "preset", config
    path = Path(config)
    if not path.is_file():
        raise CalibexportError(
            f"config {str(config)!r} is neither a preset name (valid presets: "
            f"{', '.join(sorted(PRESETS))}) nor an existing file; pass a preset name, a "
            "DDIM-style YAML file or a calibexport JSON config."
        )
    return _spec_from_file(path)


def _spec_from_file(path: Path) -> tuple[ModelSpec, str, str]:
    suffix = path.suffix.lower()
    if suffix in (".yml", ".yaml"):
        return spec_from_ddim_yaml(path), "ddim_yaml", str(path)
    if suffix != ".json":
        raise CalibexportError(
            f"config file {path} has an unknown suffix {path.suffix!r}; use .json for a "
            "calibexport config or .yml/.yaml for a DDIM-style config."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CalibexportError(
            f"could not parse JSON config {path}: {err}; the file is truncated or not JSON."
        ) from err
    except OSError as err:
        raise CalibexportError(f"could not read JSON config {path}: {err}") from err
    if not isinstance(data, dict):
        raise CalibexportError(
            f"JSON config {path} contains a {type(data).__name__}, not an object with a 'unet' "
            "section."
        )
    try:
        spec = ModelSpec.from_dict(data)
    except CalibexportError as err:
        raise CalibexportError(f"invalid model config {path}: {err}") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise CalibexportError(
            f"invalid model config {path}: {err}; compare it with the .json that "
            "save_native writes."
        ) from err
    return spec, "json", str(path)


# Reading checkpoint files ------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CalibexportError(
            f"could not read safetensors checkpoint {path}: {err}; the file is truncated or "
            "corrupted, so copy or download it again."
        ) from err


def _read_torch_file(path: Path) -> Any:
    import torch

    _check_zip_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _WEIGHTS_ONLY_FAILURE in str(err):
            raise _unsafe_pickle_error(path, err) from err
        raise _corrupt_file_error(path, err) from err
    except OSError as err:
        raise CalibexportError(f"could not read checkpoint {path}: {err}") from err
    except Exception as err:  # noqa: BLE001
        # A damaged file makes torch.load raise RuntimeError, EOFError, KeyError and others,
        # depending on where the damage is, so every remaining exception means a bad file.
        raise _corrupt_file_error(path, err) from err


def _check_zip_checksums(path: Path) -> None:
    """Raise if a member of a zip-format torch file does not match its recorded CRC-32.

    torch.load does not check these checksums, so damage inside tensor data would load as wrong
    weights. Files in torch's legacy (non-zip) format carry no checksum and are not checked.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise _corrupt_file_error(path, err) from err
    if damaged is not None:
        raise CalibexportError(
            f"checkpoint {path} is corrupted: the CRC-32 of its member {damaged!r} does not match "
            "the data, so copy or download it again."
        )


def _unsafe_pickle_error(path: Path, err: Exception) -> CalibexportError:
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    detail = f" (it references {match.group(1)})" if match else ""
    return CalibexportError(
        f"checkpoint {path} needs arbitrary unpickling to load{detail}, which can execute "
        "code, so calibexport will not load it. In a trusted environment, re-save only the "
        "weights, e.g. torch.save(model.state_dict(), path), or convert them to safetensors "
        "with safetensors.torch.save_file, and load that file instead."
    )


def _corrupt_file_error(path: Path, err: Exception) -> CalibexportError:
    lines = str(err).strip().splitlines()
    message = lines[0] if lines else "no message"
    return CalibexportError(
        f"could not read checkpoint {path}: {type(err).__name__}: {message}; the file is "
        "truncated, corrupted or not a torch checkpoint, so copy or download it again."
    )


# Choosing the weights inside a torch file --------------------------------------------------------


def _select_weights(obj: Any, path: Path, weights: str) -> tuple[str, dict[str, torch.Tensor], str]:
    """Return (format, state_dict, weights used) for the loaded contents of a torch file."""
    if isinstance(obj, (list, tuple)):
        state, weights_used = _select_from_ddim_list(obj, path, weights)
        return "ddim_list", _strip_module_prefix(state, path), weights_used
    if isinstance(obj, Mapping):
        state, weights_used = _select_from_dict(obj, path, weights)
        return "state_dict", _strip_module_prefix(state, path), weights_used
    raise CalibexportError(
        f"checkpoint {path} contains a {type(obj).__name__}; expected a state_dict, a dict with "
        "an 'ema', 'model' or 'state_dict' entry, or a DDIM list [model_state, "
        "optimizer_state, epoch, step, ema_state]."
    )


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _select_from_ddim_list(items: list[Any] | tuple[Any, ...], path: Path,
                           weights: str) -> tuple[Mapping[str, torch.Tensor], str]:
    if not items or not _is_state_dict(items[0]):
        first = type(items[0]).__name__ if items else "nothing"
        raise CalibexportError(
            f"checkpoint {path} is a list whose first element is {first}, not a state_dict; "
            "expected the DDIM layout [model_state, optimizer_state, epoch, step, ema_state]."
        )
    has_ema = len(items) >= 2 and _is_state_dict(items[-1])
    if weights == "model":
        return items[0], "model"
    if not has_ema:
        if len(items) == 1:
            reason = "its only element is the model state"
        else:
            reason = f"its last element is a {type(items[-1]).__name__}, not a state_dict"
        raise CalibexportError(
            f"checkpoint {path} has no EMA weights: {reason} (DDIM stores EMA weights only when "
            "trained with model.ema true). Pass --weights model to load the training weights."
        )
    return items[-1], "ema"


def _select_from_dict(obj: Mapping[str, Any], path: Path,
                      weights: str) -> tuple[Mapping[str, torch.Tensor], str]:
    if _is_state_dict(obj):
        return obj, UNLABELED
    entries = [key for key in ("ema", "model", "state_dict") if _is_state_dict(obj.get(key))]
    if not entries:
        keys = sorted(map(str, obj))
        raise CalibexportError(
            f"checkpoint {path} is a dict but not a state_dict (names mapped to tensors), and "
            f"none of its 'ema', 'model' or 'state_dict' entries is one; top-level keys: "
            f"{keys[:10]}{' ...' if len(keys) > 10 else ''}."
        )
    if weights in entries:
        chosen = weights
    elif "state_dict" in entries:
        chosen = "state_dict"
    else:
        other = "model" if weights == "ema" else "ema"
        raise CalibexportError(
            f"checkpoint {path} has no {weights!r} weights; entries holding weights: {entries}. "
            f"Pass --weights {other} to load those."
        )
    ignored = sorted(str(key) for key in obj if key != chosen)
    if ignored:
        logger.debug("%s: using entry %r, ignoring %s", path, chosen, ignored)
    return obj[chosen], chosen if chosen in WEIGHTS_CHOICES else UNLABELED


def _strip_module_prefix(state: Mapping[str, torch.Tensor],
                         path: Path) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix that ``torch.nn.DataParallel`` adds to every key."""
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(_MODULE_PREFIX):] if key.startswith(_MODULE_PREFIX) else key
        if name in stripped:
            raise CalibexportError(
                f"checkpoint {path} has key {name!r} both with and without the "
                f"'{_MODULE_PREFIX}' prefix; keep only one copy of the weights."
            )
        stripped[name] = tensor
    return stripped


# Building the network ---------------------------------------------------------------------------


def _build_module(spec: ModelSpec, state: dict[str, torch.Tensor], path: Path,
                  config_origin: str) -> torch.nn.Module:
    import torch

    from calibexport.models.unet import DDPMUNet

    if spec.architecture == "factory":
        from calibexport.models.factory import build_factory_module

        # A config file must not be able to run code by naming a function to import and call.
        if os.environ.get("CALIBEXPORT_TRUST_CODE") != "1":
            raise CalibexportError(
                f"config {config_origin} names a factory function "
                f"{spec.options.get('factory')!r}, which would import and run code; set "
                "CALIBEXPORT_TRUST_CODE=1 if you trust this config, or pass the factory itself "
                "as --model package.module:function."
            )
        module = build_factory_module(spec)
    elif spec.unet is None:
        raise CalibexportError(
            f"config {config_origin} describes a {spec.architecture} network, which is not read "
            f"from a weights file like {path}; pass the diffusers folder or TorchScript archive "
            "itself as the model."
        )
    else:
        if spec.unet.extra.get(MODEL_TYPE_EXTRA_KEY) == "bayesian" and "logvar" in state:
            logger.info("%s: dropping 'logvar', the learned variance of a DDIM 'bayesian' model, "
                        "which the noise prediction does not use.", path)
            state = {k: v for k, v in state.items() if k != "logvar"}

        # Built on the meta device, so no time goes into random initialisation of the parameters
        # that load_state_dict(assign=True) replaces with the checkpoint's tensors.
        with torch.device("meta"):
            module = DDPMUNet(spec.unet)
    _check_keys(module, state, path, config_origin)

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    converted = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point() and spec.architecture == "factory":
            converted[key] = tensor.detach().contiguous()  # integer buffers of custom modules
            continue
        if not tensor.is_floating_point():
            raise CalibexportError(
                f"checkpoint {path}: tensor {key!r} has dtype {tensor.dtype}, expected a "
                "floating-point dtype."
            )
        converted[key] = tensor.detach().to(torch.float32).contiguous()
    module.load_state_dict(converted, strict=True, assign=True)
    assert not any(t.is_meta for t in module.state_dict().values())
    if dtypes != ["float32"]:
        logger.info("%s: weights stored as %s, converted to float32.", path, ", ".join(dtypes))
    return module.eval()


def _check_keys(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                config_origin: str) -> None:
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {expected[key]}"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != expected[key]
    ]
    if not (missing or unexpected or mismatched):
        return
    n = _MAX_KEYS_SHOWN
    raise CalibexportError(
        f"the weights in {path} do not match the UNet built from config {config_origin}: "
        f"{len(missing)} missing keys {missing[:n]}, {len(unexpected)} unexpected keys "
        f"{unexpected[:n]}, {len(mismatched)} shape mismatches {mismatched[:n]}. Check that "
        "--config (or the config beside the checkpoint) describes this checkpoint; valid "
        f"presets: {', '.join(sorted(PRESETS))}."
    )
