"""``calibexport validate``: load an artifact and its PyTorch source, run parity, write reports."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

from calibexport.errors import CalibexportError
from calibexport.models.loaders import LoadedModel, load_model
from calibexport.runtime.artifact import load_manifest, verify_artifact_files
from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from calibexport.runtime.eta_table import load_eta_table
from calibexport.runtime.schedule import schedule_from_spec
from calibexport.validate.compare import TOLERANCE_PRESETS
from calibexport.validate.parity import ParityConfig, run_parity
from calibexport.validate.reports import write_reports
from calibexport.validate.torch_reference import TorchCalibratedBackend

logger = logging.getLogger(__name__)


def tolerance_config(preset: str) -> ParityConfig:
    if preset not in TOLERANCE_PRESETS:
        raise CalibexportError(
            f"unknown tolerance preset {preset!r}; valid presets: {', '.join(sorted(TOLERANCE_PRESETS))}."
        )
    return ParityConfig(tolerances=dict(TOLERANCE_PRESETS[preset]), tolerance_preset=preset)


def _environment() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": ["CPUExecutionProvider"],
        # TF32 only exists on CUDA providers; the CPU provider computes in full fp32.
        "tf32": False,
    }


def validate_directory(artifact_dir: Path, *, loaded: LoadedModel | None = None, tolerance_preset: str = "fp32-cpu",
                       report_dir: Path | None = None) -> dict[str, Any]:
    """Compare ``model.onnx`` in ONNX Runtime with the PyTorch model minus eta; write the reports.

    Without ``loaded``, the source checkpoint recorded in the manifest is loaded and its weights
    digest must equal the manifest's.
    """
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    verify_artifact_files(artifact_dir, manifest)
    if loaded is None:
        source = manifest.source
        model_path = Path(source["model_path"])
        if not model_path.exists():
            raise CalibexportError(
                f"the source model {model_path} recorded in {artifact_dir / 'manifest.json'} was not found; "
                "pass --model (and --config) to point at the checkpoint."
            )
        loaded = load_model(model_path, config=source.get("config"), weights=source.get("weights", "ema"))
    if loaded.weights_sha256 != manifest.weights_sha256:
        raise CalibexportError(
            f"the PyTorch model's weights ({loaded.weights_sha256[:12]}...) differ from the weights this "
            f"artifact was built from ({manifest.weights_sha256[:12]}...); pass the original checkpoint."
        )

    table = load_eta_table(artifact_dir)
    schedule = schedule_from_spec(manifest.schedule)
    config = tolerance_config(tolerance_preset)
    with OnnxRuntimeBackend(artifact_dir / "model.onnx") as deployed:
        reference = TorchCalibratedBackend(loaded.module, table, deployed.image_shape, deployed.timestep_dtype)
        result = run_parity(deployed, reference, schedule, table.values.shape[0], config)
    result.environment = _environment()
    subject = {
        "artifact": str(artifact_dir),
        "deployed": "onnxruntime:CPUExecutionProvider model.onnx",
        "reference": "pytorch eager float32: network(x, t) - eta(t)",
        "eta_sha256": table.sha256,
        "weights_sha256": loaded.weights_sha256,
    }
    report = write_reports(result, Path(report_dir or artifact_dir), subject)
    return report
