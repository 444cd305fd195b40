"""``calibexport build``: export, fold eta, write the manifest, validate, all into one atomic directory."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibexport.calibration_tables.estimate import table_coefficients
from calibexport.errors import CalibexportError
from calibexport.exporter.atomic import atomic_directory
from calibexport.exporter.fold import save_onnx
from calibexport.exporter.fold_compressed import fold_table
from calibexport.exporter.fp16 import PRECISIONS, Fp16Report, convert_to_fp16
from calibexport.exporter.fp16_scan import scan_fp16_range, scan_non_finite
from calibexport.exporter.manifest import MANIFEST_VERSION, build_manifest, write_manifest
from calibexport.exporter.onnx_export import export_onnx
from calibexport.exporter.optimize import optimize_graph
from calibexport.exporter.tensorrt_engine import build_engine_step
from calibexport.models.loaders import LoadedModel, load_model
from calibexport.runtime.eta_table import EtaTable, check_compatible, load_eta_table
from calibexport.runtime.prediction import table_log_alpha
from calibexport.runtime.schedule import schedule_from_spec

logger = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    model: Path
    eta: Path
    out: Path
    config: str | None = None
    weights: str = "ema"
    exporter: str | None = None
    opset: int | None = None
    overwrite: bool = False
    validate: bool = True
    allow_mismatch: bool = False
    #: Parity tolerance preset; None takes "fp16" for fp16 builds and "fp32-cpu" otherwise.
    tolerance_preset: str | None = None
    #: fp32, or fp16 with fp32 islands (calibexport.exporter.fp16).
    precision: str = "fp32"
    #: Fold constants and infer shapes in the exported graph (calibexport.exporter.optimize).
    optimize: bool = True
    #: TensorRT engine batch sizes MIN,OPT,MAX (default 1,8,64); used where an engine is built.
    batch_sizes: str | None = None
    #: Build model.plan when TensorRT 10+ and an NVIDIA GPU are present.
    engine: bool = True
    #: An engine cache directory, reused by builds with the same engine key.
    engine_cache: Path | None = None


@dataclass
class BuildResult:
    out: Path
    passed: bool | None
    report: dict | None


def check_eta_matches_model(table: EtaTable, loaded: LoadedModel, allow_mismatch: bool) -> None:
    """Reject a table estimated for other weights unless ``allow_mismatch`` is set."""
    # One row per model input time of the schedule, which a 'betas' or continuous spec does not
    # state as num_timesteps.
    num_timesteps = len(table_coefficients(schedule_from_spec(loaded.spec.schedule))[0])
    check_compatible(table, loaded.spec.image_shape, num_timesteps)
    if table.metadata is None:
        logger.info("%s has no eta.json sidecar: schedule and weights digest are taken from the model.", table.path)
        return
    recorded = table.metadata.get("model_weights_sha256")
    if recorded and recorded != loaded.weights_sha256:
        message = (f"eta table {table.path} was estimated for weights {recorded[:12]}..., but the model has "
                   f"weights {loaded.weights_sha256[:12]}...; re-run `calibexport calibrate` for this "
                   "model, or pass --allow-mismatch to build anyway.")
        if not allow_mismatch:
            raise CalibexportError(message)
        logger.warning("%s (continuing because --allow-mismatch is set)", message)


def build_artifact(options: BuildOptions) -> BuildResult:
    """Write OUT/model.onnx, eta.npy, eta.json, manifest.json and the parity reports atomically.

    A build whose parity checks fail is not installed at OUT: its files move to OUT.rejected for
    inspection, so no later run can mistake them for a validated artifact.
    """
    start = time.perf_counter()
    # Cheap checks first, so a typo does not cost a model load.
    from calibexport.models.factory import is_factory_reference

    if not Path(options.model).exists() and not is_factory_reference(str(options.model)):
        raise CalibexportError(
            f"model {options.model} not found; pass a checkpoint file, a model folder or "
            "package.module:function."
        )
    table = load_eta_table(options.eta)
    if options.out.exists() and not options.overwrite:
        raise CalibexportError(
            f"{options.out} already exists; pass --overwrite to replace it or choose another --out."
        )
    loaded = load_model(options.model, config=options.config, weights=options.weights)
    check_eta_matches_model(table, loaded, options.allow_mismatch)
    image_shape = loaded.spec.image_shape
    precision = _check_precision(options.precision)
    rejected = options.out.with_name(options.out.name + ".rejected")

    with atomic_directory(options.out, overwrite=options.overwrite) as tmp:
        tmp = Path(tmp)
        logger.info("Building %s from %s and %s ...", options.out, options.model, options.eta)
        network_path = tmp / "network.onnx"
        export_options = {"exporter": options.exporter} if options.exporter else {}
        export_info = export_onnx(loaded.module, network_path, image_shape=image_shape, opset=options.opset,
                                  **export_options)

        import onnx

        metadata = {
            "calibexport.manifest_version": str(MANIFEST_VERSION),
            "calibexport.prediction_type": loaded.spec.prediction_type,
            "calibexport.schedule": _json(loaded.spec.schedule),
            "calibexport.eta_sha256": table.sha256,
            "calibexport.weights_sha256": loaded.weights_sha256,
        }
        network = onnx.load(str(network_path))
        for path in (network_path, network_path.with_name(network_path.name + ".data")):
            path.unlink(missing_ok=True)
        if options.optimize:
            network = optimize_graph(network)
        fp32_network, fp16_report = network, None
        if precision == "fp16":
            fp16_report = Fp16Report()
            network = convert_to_fp16(network, report=fp16_report)
            metadata["calibexport.precision"] = "fp16"
        prediction_type = loaded.spec.prediction_type
        log_alpha = None
        if prediction_type != "eps":
            log_alpha = table_log_alpha(schedule_from_spec(loaded.spec.schedule), len(table.values))
        # In place: nothing reads the unfolded network afterwards (fp16 keeps its own copy).
        folded = fold_table(network, table, timestep_input="t", metadata=metadata,
                            prediction_type=prediction_type, log_alpha=log_alpha, copy=False)
        save_onnx(folded, tmp / "model.onnx")
        if fp16_report is not None:
            scan_fp16_range(fp32_network, fp16_report.fp16_values, num_timesteps=len(table.values))
            scan_non_finite(tmp / "model.onnx", num_timesteps=len(table.values))
        table_files = _copy_table(table, tmp)

        # A model past the 2 GiB protobuf limit keeps its weights in model.onnx.data.
        weight_files = ["model.onnx.data"] if (tmp / "model.onnx.data").exists() else []
        files = ["model.onnx", *weight_files, *table_files]
        manifest = build_manifest(
            tmp, schedule=loaded.spec.schedule, prediction_type=loaded.spec.prediction_type,
            image_shape=image_shape, num_timesteps=table.values.shape[0],
            weights_sha256=loaded.weights_sha256, model_path=_model_reference(options.model),
            config=_config_reference(options.config), weights=options.weights,
            export_info={**export_info.to_dict(), "precision": precision,
                         "optimized": options.optimize,
                         **({"fp16": fp16_report.to_dict()} if fp16_report else {})},
            eta_sha256=table.sha256, files=files,
        )
        write_manifest(tmp, manifest)

        build_engine_step(tmp, enabled=options.engine, batch_sizes=options.batch_sizes,
                          cache_dir=options.engine_cache)

        report = None
        passed = None
        if options.validate:
            from calibexport.validate.run import validate_directory

            preset = options.tolerance_preset or ("fp16" if precision == "fp16" else "fp32-cpu")
            report = validate_directory(tmp, loaded=loaded, tolerance_preset=preset)
            passed = report["status"] == "PASSED"
            if not passed:
                if rejected.exists():
                    shutil.rmtree(rejected)
                shutil.copytree(tmp, rejected)
                raise ParityFailed(rejected, report)
        else:
            logger.info("Validation skipped (--no-validate).")

    logger.info("Built %s in %.1fs.", options.out, time.perf_counter() - start)
    return BuildResult(options.out, passed, report)


class ParityFailed(CalibexportError):
    """The built model did not match the PyTorch reference; the build was not installed."""

    def __init__(self, rejected: Path, report: dict) -> None:
        failed = [c["name"] for c in report["checks"] if not c["passed"]]
        super().__init__(f"parity failed ({', '.join(failed)}); the build was not installed. "
                         f"Reports and files are in {rejected} (see parity.md there).")
        self.rejected = rejected
        self.report = report


def _copy_table(table: EtaTable, directory: Path) -> list[str]:
    """Copy the table (eta.npy, or eta.npz if compressed) and its sidecar; return the names."""
    from calibexport.calibration_tables.compress import save_compressed_table
    from calibexport.calibration_tables.table_io import save_eta_table

    if table.compressed is not None:
        save_compressed_table(directory / "eta.npz", table.compressed, table.metadata)
        names = ["eta.npz"]
    else:
        save_eta_table(directory / "eta.npy", table.values, table.metadata)
        names = ["eta.npy"]
    return names + (["eta.json"] if table.metadata is not None else [])


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise CalibexportError(
            f"invalid precision {precision!r}; valid choices: {', '.join(PRECISIONS)}."
        )
    return precision


def _model_reference(model: Path | str) -> str:
    """Record a model path absolutely, and a package.module:function factory as written."""
    from calibexport.models.factory import is_factory_reference

    if is_factory_reference(str(model)) and not Path(model).exists():
        return str(model)
    return str(Path(model).resolve())


def _config_reference(config: str | None) -> str | None:
    """Record a config file by absolute path so validate works from any directory; presets by name."""
    if config is not None and Path(config).exists():
        return str(Path(config).resolve())
    return config


def _json(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True)
