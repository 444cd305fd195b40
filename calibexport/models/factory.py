"""Networks built by user code: a ``module:function`` factory for custom architectures.

Two forms are accepted:

* ``--model package.module:function``: the function takes no arguments and returns a ready
  network, or a pair ``(network, config)`` where ``config`` is a model config dict (keys
  ``image_shape``, ``schedule``, ``prediction_type``). Without that dict, ``--config`` gives one.
* ``--model weights.safetensors --config net.json`` with ``"architecture": "factory"`` and
  ``"options": {"factory": "package.module:function", "factory_kwargs": {...}}`` in the JSON: the
  function builds the architecture from the keyword arguments and the checkpoint's weights are
  loaded into it with the same strict key check as for the built-in UNet.

The network is called as ``network(x, timestep)`` with ``x`` [B, C, H, W] and ``timestep`` [B],
and must return one tensor shaped like ``x``. Importing the module runs its code, so a factory
is as trusted as any code on the Python path.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import TYPE_CHECKING, Any

from calibexport.errors import CalibexportError
from calibexport.models.presets import ModelSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: ``package.module:function`` with Python identifiers on both sides.
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory_reference(value: str) -> bool:
    """Return whether ``value`` has the ``package.module:function`` form."""
    return bool(FACTORY_PATTERN.match(value))


def resolve_factory(reference: str) -> Any:
    """Import ``package.module`` and return its callable ``function``."""
    if not is_factory_reference(reference):
        raise CalibexportError(
            f"invalid factory reference {reference!r}; write it as package.module:function."
        )
    module_name, function_name = reference.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CalibexportError(
            f"cannot import module {module_name!r} of factory {reference!r}: {exc}. Install the "
            "package or add its folder to PYTHONPATH."
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise CalibexportError(
            f"module {module_name!r} has no callable {function_name!r}; check the factory "
            f"reference {reference!r}."
        )
    return function


def call_factory(reference: str, kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Call the factory and return (network, config dict or None), checking the network type."""
    import torch

    function = resolve_factory(reference)
    try:
        result = function(**(kwargs or {}))
    except Exception as exc:  # user code can raise anything; report it with the reference
        raise CalibexportError(
            f"factory {reference!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    config = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        result, config = result
    if not isinstance(result, torch.nn.Module):
        raise CalibexportError(
            f"factory {reference!r} returned a {type(result).__name__}; it must return a "
            "torch.nn.Module, or a (module, config dict) pair."
        )
    return result, config


def build_factory_module(spec: ModelSpec) -> torch.nn.Module:
    """Build the architecture of a ``factory`` spec, with the weights the factory initialises."""
    reference = spec.options.get("factory")
    if not isinstance(reference, str):
        raise CalibexportError(
            "a model config with architecture 'factory' needs options.factory set to "
            f"'package.module:function'; options seen: {sorted(spec.options)}."
        )
    kwargs = spec.options.get("factory_kwargs", {})
    if not isinstance(kwargs, dict):
        raise CalibexportError(
            f"options.factory_kwargs must be a JSON object, got {type(kwargs).__name__}."
        )
    module, _ = call_factory(reference, kwargs)
    return module


def load_factory_network(reference: str,
                         config_spec: ModelSpec | None) -> tuple[torch.nn.Module, ModelSpec]:
    """Call a no-argument factory; return its float32 network in eval mode and its spec.

    The spec is the factory's own config dict when it returns one, else ``config_spec``.
    """
    module, config = call_factory(reference)
    if config is not None:
        spec = ModelSpec.from_dict({"architecture": "factory", **config,
                                    "options": {**config.get("options", {}),
                                                "factory": reference}})
    elif config_spec is not None:
        spec = config_spec
    else:
        raise CalibexportError(
            f"factory {reference!r} returned a network without a config, and no --config was "
            "passed. Return (network, {'image_shape': [C, H, W], 'schedule': {...}, "
            "'prediction_type': 'eps'}) or pass --config with a JSON model config."
        )
    _check_float32(module, reference)
    return module.eval(), spec


def _check_float32(module: torch.nn.Module, reference: str) -> None:
    import torch

    other = sorted({str(t.dtype).removeprefix("torch.") for t in module.state_dict().values()
                    if t.is_floating_point() and t.dtype != torch.float32})
    if other:
        raise CalibexportError(
            f"factory {reference!r} returned a network with {', '.join(other)} weights; return it "
            "in float32 (call .float() on it) so export and validation see the reference "
            "precision."
        )
