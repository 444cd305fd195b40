"""``calibexport validate``: compare an artifact's ONNX model with its reference, write reports.

The reference is the PyTorch calibrated model (``network(x, t) - eta(t)``), or the outputs saved
by an earlier run with ``save_reference`` (``ValidateOptions.reference``). This module imports
torch only for the PyTorch reference, so comparing with a saved reference needs no torch.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibexport.errors import CalibexportError
from calibexport.runtime.artifact import Manifest, load_manifest, verify_artifact_files
from calibexport.runtime.eta_table import load_eta_table
from calibexport.runtime.schedule import schedule_from_spec
from calibexport.validate.compare import apply_overrides, preset_tolerances
from calibexport.validate.parity import (
    ParityConfig,
    ParityResult,
    compare_with_reference,
    parse_runs,
    run_parity,
)
from calibexport.validate.reports import parity_to_dict, write_reports

if TYPE_CHECKING:
    from calibexport.models.loaders import LoadedModel

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class ValidateOptions:
    """Options of ``validate_directory``. None means the default, or the reference file's value."""

    #: A name of ``TOLERANCE_PRESETS`` or ``auto`` (chosen from the model precision and provider).
    tolerance_preset: str = "auto"
    #: ``--atol``/``--rtol`` texts, each ``VALUE`` for every level or ``LEVEL=VALUE``.
    atol: list[str] = field(default_factory=list)
    rtol: list[str] = field(default_factory=list)
    #: ``full``, ``quick`` or ``METHOD:ORDER:NFE,...``. None means full.
    runs: str | None = None
    provider: str = "cpu"
    tf32: bool = False
    seed: int | None = None
    num_samples: int | None = None
    max_rows: int | None = None
    save_inputs: Path | None = None
    save_reference: Path | None = None
    reference: Path | None = None


def check_options(options: ValidateOptions) -> None:
    """Raise CalibexportError for invalid values and combinations, before any work starts."""
    if options.provider not in PROVIDERS:
        raise CalibexportError(
            f"unknown provider {options.provider!r}; valid providers: {', '.join(PROVIDERS)}."
        )
    if options.tf32 and options.provider != "cuda":
        raise CalibexportError("--tf32 applies to --provider cuda only; the CPU provider has no "
                               "TF32 mode.")
    for name, value, minimum in (("--seed", options.seed, 0), ("--num-samples",
                                 options.num_samples, 1), ("--max-rows", options.max_rows, 2)):
        if value is not None and value < minimum:
            raise CalibexportError(f"{name} must be >= {minimum}, got {value}.")
    if options.reference is not None:
        fixed = [name for name, value in (("--runs", options.runs), ("--seed", options.seed),
                 ("--num-samples", options.num_samples), ("--max-rows", options.max_rows),
                 ("--save-reference", options.save_reference)) if value is not None]
        if fixed:
            raise CalibexportError(
                f"{', '.join(fixed)} cannot be combined with --reference, because the reference "
                f"file fixes the inputs and runs; drop {' and '.join(fixed)}."
            )
        if not Path(options.reference).is_file():
            raise CalibexportError(
                f"reference file {options.reference} not found; write one with `calibexport "
                f"validate --save-reference FILE` on the reference machine."
            )
    if options.tolerance_preset != "auto":
        preset_tolerances(options.tolerance_preset)
    apply_overrides(preset_tolerances("fp32-cpu"), options.atol, options.rtol)
    if options.runs is not None:
        parse_runs(options.runs)


def _open_deployed(model_path: Path, provider: str, tf32: bool) -> Any:
    import onnxruntime

    from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend

    name = PROVIDERS[provider]
    available = onnxruntime.get_available_providers()
    if name not in available:
        raise CalibexportError(
            f"ONNX Runtime provider {name} is not available (available: {', '.join(available)}); "
            f"install onnxruntime-gpu on a host with an NVIDIA GPU, or pass --provider cpu."
        )
    providers: list[Any] = [name]
    if provider == "cuda":
        # The CUDA provider uses TF32 for float32 matmuls and convolutions unless use_tf32 is 0.
        providers = [(name, {"use_tf32": "1" if tf32 else "0"})]
    backend = OnnxRuntimeBackend(model_path, providers=providers)
    used = backend.session.get_providers()
    if used[0] != name:
        raise CalibexportError(f"ONNX Runtime opened {model_path} with {used} instead of {name}.")
    return backend


def _auto_preset(deployed: Any, manifest: Manifest, provider: str) -> str:
    x_type = next(i.type for i in deployed.session.get_inputs() if i.name == deployed.x_input)
    # fp16 builds keep float32 inputs and record their precision in the ONNX metadata.
    recorded = deployed.metadata.get("calibexport.precision", manifest.export.get("precision"))
    if x_type == "tensor(float16)" or recorded == "fp16":
        return "fp16"
    return "fp32-gpu" if provider == "cuda" else "fp32-cpu"


def _environment(deployed: Any, tf32: bool, torch_used: bool) -> dict[str, Any]:
    import onnxruntime

    environment = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor_count": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": deployed.session.get_providers(),
        # Only CUDA providers have TF32. The CPU provider computes in full float32.
        "tf32": bool(tf32),
    }
    if torch_used:
        import torch

        environment["torch"] = torch.__version__
        environment["torch_threads"] = torch.get_num_threads()
    return environment


def _artifact_facts(manifest: Manifest, eta_sha256: str) -> dict[str, Any]:
    return {
        "weights_sha256": manifest.weights_sha256,
        "eta_sha256": eta_sha256,
        "schedule": manifest.schedule,
        "image_shape": list(manifest.image_shape),
        "num_timesteps": manifest.num_timesteps,
    }


def _check_reference_matches(saved: dict[str, Any], facts: dict[str, Any], path: Path) -> None:
    differing = [key for key, value in facts.items() if saved.get(key) != value]
    if differing:
        details = "; ".join(f"{key}: file {saved.get(key)!r}, artifact {facts[key]!r}"
                            for key in differing)
        raise CalibexportError(
            f"reference file {path} belongs to another model ({details}); save a reference for "
            f"this artifact's source model and eta table."
        )


def _load_torch_reference(artifact_dir: Path, manifest: Manifest,
                          loaded: LoadedModel | None) -> LoadedModel:
    from calibexport.models.loaders import load_model

    if loaded is None:
        source = manifest.source
        model_path = Path(source["model_path"])
        if not model_path.exists():
            raise CalibexportError(
                f"the source model {model_path} recorded in {artifact_dir / 'manifest.json'} was "
                "not found; pass --model (and --config) to point at the checkpoint."
            )
        loaded = load_model(model_path, config=source.get("config"),
                            weights=source.get("weights", "ema"))
    if loaded.weights_sha256 != manifest.weights_sha256:
        raise CalibexportError(
            f"the PyTorch model's weights ({loaded.weights_sha256[:12]}...) differ from the "
            f"weights this artifact was built from ({manifest.weights_sha256[:12]}...); pass the "
            "original checkpoint."
        )
    return loaded


def _parity_config(options: ValidateOptions, preset: str) -> ParityConfig:
    tolerances, overrides = apply_overrides(preset_tolerances(preset), options.atol, options.rtol)
    config = ParityConfig(tolerances=tolerances, tolerance_preset=preset,
                          tolerance_overrides=overrides)
    if options.runs is not None:
        config.runs = parse_runs(options.runs)
    for name in ("seed", "num_samples", "max_rows"):
        if getattr(options, name) is not None:
            setattr(config, name, getattr(options, name))
    return config


def validate_directory(artifact_dir: Path, *, loaded: LoadedModel | None = None,
                       tolerance_preset: str | None = None, report_dir: Path | None = None,
                       options: ValidateOptions | None = None) -> dict[str, Any]:
    """Compare ``model.onnx`` in ONNX Runtime with its reference; write and return the report.

    Without ``loaded``, the source checkpoint recorded in the manifest is loaded, and its weights
    digest must equal the manifest's. ``tolerance_preset`` overrides ``options.tolerance_preset``.
    """
    options = options or ValidateOptions()
    if tolerance_preset is not None:
        options = replace(options, tolerance_preset=tolerance_preset)
    check_options(options)
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    verify_artifact_files(artifact_dir, manifest)
    table = load_eta_table(artifact_dir)
    facts = _artifact_facts(manifest, table.sha256)
    schedule = schedule_from_spec(manifest.schedule)

    with _open_deployed(artifact_dir / "model.onnx", options.provider, options.tf32) as deployed:
        preset = options.tolerance_preset
        if preset == "auto":
            preset = _auto_preset(deployed, manifest, options.provider)
        config = _parity_config(options, preset)
        logger.info("Validating %s: provider %s, TF32 %s, tolerance preset %s, runs %s",
                    artifact_dir, options.provider, "on" if options.tf32 else "off", preset,
                    ", ".join(run.name for run in config.runs) if options.reference is None
                    else f"from {options.reference}")
        result, reference_text = _run(deployed, artifact_dir, manifest, table, schedule, facts,
                                      config, options, loaded)
        result.environment = _environment(deployed, options.tf32, options.reference is None)
        reproduce = None
        if options.save_inputs is not None:
            reproduce = _save_inputs(options.save_inputs, result, deployed, config,
                                     artifact_dir / "model.onnx")
        deployed_text = f"ONNX Runtime {', '.join(deployed.session.get_providers())}, model.onnx"

    if options.save_reference is not None:
        from calibexport.validate.reference_file import save_reference

        result.reference.source.update(environment=result.environment, config=result.config,
                                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        save_reference(options.save_reference, result.reference, facts)
    subject = {"artifact": str(artifact_dir), "deployed": deployed_text,
               "reference": reference_text, "eta_sha256": table.sha256,
               "weights_sha256": manifest.weights_sha256,
               "reference_file": None if options.reference is None else str(options.reference)}
    report = parity_to_dict(result, subject, _tolerances_dict(preset, config), reproduce)
    write_reports(report, Path(report_dir or artifact_dir))
    return report


def _tolerances_dict(preset: str, config: ParityConfig) -> dict[str, Any]:
    return {"preset": preset, "overrides": config.tolerance_overrides,
            "levels": {level: {"atol": tol.atol, "rtol": tol.rtol}
                       for level, tol in config.tolerances.items()}}


def _save_inputs(directory: Path, result: ParityResult, deployed: Any, config: ParityConfig,
                 model_path: Path) -> dict[str, Any]:
    from calibexport.validate.polygraphy_files import save_polygraphy_files

    evaluation = config.tolerances["evaluation"]
    return save_polygraphy_files(
        directory, result.reference, x_input=deployed.x_input,
        timestep_input=deployed.timestep_input, timestep_dtype=deployed.timestep_dtype,
        output_name=deployed.output_name, model_path=model_path,
        tolerance=(evaluation.atol, evaluation.rtol),
    )


def _run(deployed: Any, artifact_dir: Path, manifest: Manifest, table: Any, schedule: Any,
         facts: dict[str, Any], config: ParityConfig, options: ValidateOptions,
         loaded: LoadedModel | None) -> tuple[ParityResult, str]:
    """Run parity against the saved reference file or the PyTorch model; describe the reference."""
    # Sampling runs convert an x0 or v output to eps (calibexport.runtime.sampler.make_eps_fn).
    deployed.prediction_type = manifest.prediction_type
    if options.reference is not None:
        from calibexport.validate.reference_file import load_reference

        saved, saved_facts = load_reference(options.reference)
        _check_reference_matches(saved_facts, facts, options.reference)
        config.seed, config.num_samples = saved.seed, saved.num_samples
        config.runs = tuple(record.run for record in saved.trajectories)
        result = compare_with_reference(deployed, schedule, saved, config)
        # The saved inputs were chosen with the saving run's settings, such as max_rows.
        result.config = {**result.config, **saved.source.get("config", {})}
        environment = saved.source.get("environment", {})
        text = (f"saved {saved.source.get('backend')} outputs from {options.reference} "
                f"(platform {environment.get('platform', 'unknown')}, created "
                f"{saved.source.get('created', 'unknown')})")
        return result, text

    from calibexport.validate.torch_reference import TorchCalibratedBackend

    loaded = _load_torch_reference(artifact_dir, manifest, loaded)
    reference = TorchCalibratedBackend(loaded.module, table, deployed.image_shape,
                                       deployed.timestep_dtype,
                                       prediction_type=manifest.prediction_type, schedule=schedule)
    result = run_parity(deployed, reference, schedule, table.values.shape[0], config,
                        record_calls=options.save_inputs is not None)
    result.reference.source["description"] = "PyTorch eager float32 on the CPU"
    return result, "PyTorch eager float32 on the CPU: network(x, t) - eta(t)"
