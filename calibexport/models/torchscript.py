"""TorchScript archives (``torch.jit.save``) as noise-prediction networks.

An archive stores the network's code and weights but not its image shape, noise schedule or
prediction type, so those come from a model config: ``NAME.json`` beside the archive or
``--config``, with ``"architecture": "torchscript"`` and ``"image_shape": [C, H, W]``.
Loading runs the archive's TorchScript code (a restricted language, not arbitrary Python), so
load archives from trusted sources only. The archive is exported to ONNX with the TorchScript
exporter, because the dynamo exporter cannot trace a ``torch.jit.ScriptModule``.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from calibexport.errors import CalibexportError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def is_torchscript_archive(path: Path) -> bool:
    """Return whether ``path`` is a zip whose entries include TorchScript code.

    ``torch.save`` also writes zip files, but only ``torch.jit.save`` adds ``constants.pkl`` and
    the ``code/`` folder.
    """
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("/constants.pkl") for name in names) and any(
        "/code/" in name for name in names)


def load_torchscript(path: Path) -> torch.nn.Module:
    """Load the archive on the CPU in eval mode, with float32 weights."""
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit.load raises RuntimeError and others for bad archives
        raise CalibexportError(
            f"could not load TorchScript archive {path}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}; the "
            "file is truncated or was saved by a newer torch."
        ) from exc
    dtypes = {t.dtype for t in module.state_dict().values() if t.is_floating_point()}
    if dtypes - {torch.float32}:
        logger.info("%s: weights stored as %s, converted to float32.", path,
                    ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)))
        module = module.float()
    return module.eval()
