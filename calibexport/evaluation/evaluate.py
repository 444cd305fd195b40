"""Sample quality with and without calibration over a grid of solver settings.

For every distinct sample set of the plan (``calibexport.evaluation.plan``), every seed and both
model variants, ``run_evaluation`` draws ``num_samples`` samples and computes the Frechet
distance of their features to the features of a reference data set. The two variants share one
network: the uncalibrated eps is the backend's output and the calibrated eps is that output
minus ``EtaTable.at(timestep)``, the numpy reference of the rule the ONNX eta fold implements.
Both variants start from the same noise (sample i of seed s is seeded by (s, i)), so their
difference is a paired comparison.

Samples are cached as ``.npy`` files under ``work_dir/samples``: uncalibrated ones in
``uncalibrated/`` and calibrated ones in ``calibrated-<first 12 hex digits of the eta sha256>/``.
A rerun with the same settings reuses them, so an interrupted evaluation resumes where it
stopped, and another eta table for the same model reuses the uncalibrated samples.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.evaluation.distributed import RankContext
from calibexport.evaluation.frechet import (
    GaussianStats,
    frechet_distance,
    frechet_mean_term,
    gaussian_stats,
)
from calibexport.evaluation.plan import (
    PAPER_NFES,
    PAPER_ORDERS,
    SolverConfig,
    network_evaluations,
    plan_configs,
    unique_sample_sets,
)
from calibexport.runtime.backends.base import EpsBackend
from calibexport.runtime.eta_table import EtaTable
from calibexport.runtime.noise import initial_noise
from calibexport.runtime.sampler import make_eps_fn
from calibexport.runtime.schedule import VPSchedule
from calibexport.runtime.solvers import solve

logger = logging.getLogger(__name__)

FeatureFn = Callable[[np.ndarray], np.ndarray]
SETTINGS_FILE = "settings.json"
VARIANTS = {False: "uncalibrated", True: "calibrated"}
VARIANT_NAMES = tuple(VARIANTS.values())


@dataclass
class EvaluationOptions:
    """Sampling plan: the grid, the seeds, the variants and the solver options of every config."""

    settings: tuple[str, ...] = ("fixed", "fast")
    orders: tuple[int, ...] = PAPER_ORDERS
    nfes: tuple[int, ...] = PAPER_NFES
    seeds: tuple[int, ...] = (0, 1, 2)
    #: Subset of ``VARIANT_NAMES`` to sample.
    variants: tuple[str, ...] = VARIANT_NAMES
    num_samples: int = 500
    batch_size: int = 250
    spacing: str = "logSNR"
    t_end: float | None = None
    denoise_to_zero: bool = False

    def configs(self) -> list[SolverConfig]:
        return plan_configs(self.settings, self.orders, self.nfes)

    def calibrated_flags(self) -> tuple[bool, ...]:
        """Return the variants to sample as flags, uncalibrated first."""
        unknown = [name for name in self.variants if name not in VARIANT_NAMES]
        if unknown or not self.variants:
            raise CalibexportError(
                f"variants {list(self.variants)} are invalid; valid variants: "
                f"{', '.join(VARIANT_NAMES)}."
            )
        return tuple(flag for flag, name in VARIANTS.items() if name in self.variants)

    def network_evaluations(self) -> int:
        return network_evaluations(self.configs(), self.num_samples, len(self.seeds),
                                   len(self.calibrated_flags()))


class OffsetBackend(EpsBackend):
    """Subtract eta(timestep) from another backend's eps: the calibrated model in numpy."""

    def __init__(self, base: EpsBackend, table: EtaTable) -> None:
        self.base = base
        self.table = table
        self.name = f"{base.name}-eta"
        self.image_shape = tuple(base.image_shape)
        self.timestep_dtype = base.timestep_dtype

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        return self.base.eps(x, timestep) - self.table.at(timestep.astype(np.float64))


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Return the images clipped to [-1, 1] and flattened to [N, C*H*W] float64 rows."""
    return np.clip(np.asarray(images, dtype=np.float64), -1.0, 1.0).reshape(len(images), -1)


@dataclass
class _Unit:
    """One sample set: a config's step orders, a variant and a seed."""

    config: SolverConfig
    calibrated: bool
    seed: int

    @property
    def name(self) -> str:
        return f"{self.config.sample_key}-seed{self.seed}"


@dataclass
class _Progress:
    """Network evaluations planned and done; ``generated`` and ``seconds`` exclude cached sets."""

    total: int
    done: int = 0
    generated: int = 0
    seconds: float = 0.0


def generate_samples(
    eps_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    schedule: VPSchedule,
    config: SolverConfig,
    seed: int,
    indices: np.ndarray,
    image_shape: tuple[int, int, int],
    options: EvaluationOptions,
) -> np.ndarray:
    """Return samples [len(indices), C, H, W] float32 for ``config`` from noise seeded (seed, i)."""
    batches = [np.empty((0, *image_shape), dtype=np.float32)]
    for first in range(0, len(indices), options.batch_size):
        x_T = initial_noise(seed, indices[first : first + options.batch_size], image_shape)
        samples = solve(
            eps_fn, x_T, schedule,
            steps=config.nfe, order=config.order, method=config.method, spacing=options.spacing,
            t_end=options.t_end, denoise_to_zero=options.denoise_to_zero,
        )
        batches.append(samples.astype(np.float32, copy=False))
    return np.concatenate(batches, axis=0)


def prepare_work_dir(work_dir: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Create ``work_dir`` and record ``fingerprint``; reject cached samples of other settings."""
    work_dir.mkdir(parents=True, exist_ok=True)
    settings_path = work_dir / SETTINGS_FILE
    text = json.dumps(fingerprint, indent=2, sort_keys=True) + "\n"
    if settings_path.is_file():
        recorded = json.loads(settings_path.read_text())
        if recorded != json.loads(text):
            if not overwrite:
                changed = sorted(k for k in set(recorded) | set(fingerprint)
                                 if recorded.get(k) != fingerprint.get(k))
                raise CalibexportError(
                    f"{work_dir} contains samples made with other settings (changed: "
                    f"{', '.join(changed)}); pass --overwrite to delete them or choose "
                    "another --out."
                )
            logger.info("Deleting cached samples and network of other settings in %s.", work_dir)
            shutil.rmtree(work_dir / "samples", ignore_errors=True)
            (work_dir / "network.onnx").unlink(missing_ok=True)
    (work_dir / "samples").mkdir(exist_ok=True)
    settings_path.write_text(text)


class Evaluation:
    """Run the grid of ``options`` and collect Frechet distances per config, variant and seed."""

    def __init__(
        self,
        backend: EpsBackend,
        table: EtaTable,
        schedule: VPSchedule,
        reference: np.ndarray,
        features: dict[str, FeatureFn],
        options: EvaluationOptions,
        work_dir: Path,
        context: RankContext | None = None,
    ) -> None:
        self.schedule = schedule
        self.options = options
        self.features = features
        self.work_dir = Path(work_dir)
        self.context = context or RankContext()
        self.image_shape = tuple(backend.image_shape)
        self.eps_fns = {
            False: make_eps_fn(backend, schedule),
            True: make_eps_fn(OffsetBackend(backend, table), schedule),
        }
        self.reference: dict[str, GaussianStats] = {}
        if self.context.is_main:
            self.reference = {name: gaussian_stats(fn(reference)) for name, fn in features.items()}
        self.num_reference = int(len(reference))
        self.folders = {
            False: self.work_dir / "samples" / "uncalibrated",
            True: self.work_dir / "samples" / f"calibrated-{table.sha256[:12]}",
        }
        if self.context.is_main:
            for calibrated in options.calibrated_flags():
                self.folders[calibrated].mkdir(parents=True, exist_ok=True)
        self.metrics: dict[tuple[bool, str], dict[str, dict[str, float]]] = {}

    def run(self, on_pass: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Sample every unit, seed by seed; call ``on_pass(results)`` on rank 0 after each seed."""
        unique = list(unique_sample_sets(self.options.configs()).values())
        progress = _Progress(total=self.options.network_evaluations())
        completed: list[int] = []
        for seed in self.options.seeds:
            for config in unique:
                for calibrated in self.options.calibrated_flags():
                    self._run_unit(_Unit(config, calibrated, seed), progress)
            completed.append(seed)
            if self.context.is_main and on_pass is not None:
                on_pass(self.results(completed))
        # Only rank 0 measures, so other ranks have no results to return.
        return self.results(completed) if self.context.is_main else {}

    def _run_unit(self, unit: _Unit, progress: _Progress) -> None:
        path = self.folders[unit.calibrated] / f"{unit.name}.npy"
        cached = self.context.broadcast(path.is_file() if self.context.is_main else None)
        evaluations = unit.config.actual_nfe * self.options.num_samples
        start = time.perf_counter()
        if cached:
            samples = np.load(path) if self.context.is_main else None
        else:
            indices = self.context.share(self.options.num_samples)
            share = generate_samples(
                self.eps_fns[unit.calibrated], self.schedule, unit.config, unit.seed, indices,
                self.image_shape, self.options,
            )
            samples = self.context.gather(share)
            if self.context.is_main:
                # Write then rename, so an interrupted run leaves no truncated cache file.
                partial = path.with_name(path.name + ".partial")
                with open(partial, "wb") as handle:
                    np.save(handle, samples)
                partial.replace(path)
        seconds = time.perf_counter() - start
        progress.done += evaluations
        if not cached:
            progress.generated += evaluations
            progress.seconds += seconds
        if self.context.is_main:
            self.metrics[unit.calibrated, unit.name] = self._measure(samples)
            self._log_unit(unit, cached, seconds, evaluations, progress)

    def _measure(self, samples: np.ndarray) -> dict[str, dict[str, float]]:
        if len(samples) != self.options.num_samples:
            raise CalibexportError(
                f"a cached sample file has {len(samples)} samples instead of "
                f"{self.options.num_samples}; delete the output folder's samples and rerun."
            )
        measured = {}
        for name, fn in self.features.items():
            stats = gaussian_stats(fn(samples))
            measured[name] = {
                "fd": frechet_distance(stats, self.reference[name]),
                "mean_term": frechet_mean_term(stats, self.reference[name]),
            }
        return measured

    def _log_unit(self, unit: _Unit, cached: bool, seconds: float, evaluations: int,
                  progress: _Progress) -> None:
        config = unit.config
        measured = self.metrics[unit.calibrated, unit.name]
        fds = ", ".join(f"{space} {value['fd']:.4g}" for space, value in measured.items())
        remaining = 0.0
        if progress.generated > 0:
            rate = progress.generated / progress.seconds
            remaining = (progress.total - progress.done) / rate
        how = "cached"
        if not cached:
            how = f"{seconds:.1f}s, {evaluations / max(seconds, 1e-9):.0f} eval/s"
        logger.info(
            "%s order %d NFE %d (real %d) %s seed %d: %s; FD %s. Done %d%%, about %.0f min left.",
            config.setting, config.order, config.nfe, config.actual_nfe, VARIANTS[unit.calibrated],
            unit.seed, how, fds, 100 * progress.done // max(progress.total, 1), remaining / 60,
        )

    def results(self, seeds: Sequence[int]) -> dict[str, Any]:
        """Return the JSON-serialisable results of the seeds in ``seeds``."""
        rows = []
        for config in self.options.configs():
            for calibrated in self.options.calibrated_flags():
                names = [_Unit(config, calibrated, seed).name for seed in seeds]
                metrics = {
                    space: {
                        key: [self.metrics[calibrated, name][space][key] for name in names]
                        for key in ("fd", "mean_term")
                    }
                    for space in self.features
                }
                rows.append({
                    "setting": config.setting, "method": config.method, "order": config.order,
                    "nfe": config.nfe, "actual_nfe": config.actual_nfe,
                    "step_orders": list(config.step_orders), "sample_key": config.sample_key,
                    "calibrated": calibrated, "metrics": metrics,
                })
        return {
            "options": asdict(self.options),
            "seeds_completed": list(seeds),
            "feature_spaces": list(self.features),
            "num_reference": self.num_reference,
            "rows": rows,
        }


@dataclass
class ModelInputs:
    """Sources of the model, its eta table and the reference data."""

    model: Path
    eta: Path
    data: str = "digits:all"
    config: str | None = None
    weights: str = "ema"
    allow_mismatch: bool = False


def _eta_summary(table: EtaTable) -> dict[str, Any]:
    """Return the estimation settings recorded in the table's sidecar (empty without one)."""
    metadata = table.metadata or {}
    return {key: metadata[key] for key in ("num_samples", "estimator", "seed") if key in metadata}


def _open_backend(name: str, loaded: Any, image_shape: tuple[int, int, int], work_dir: Path,
                  context: RankContext, threads: int | None,
                  exporter: str | None = None) -> EpsBackend:
    """Open the uncalibrated network: ONNX Runtime on an export in ``work_dir``, or torch."""
    if name == "torch":
        import torch

        from calibexport.validate.torch_reference import TorchCalibratedBackend

        if threads:
            torch.set_num_threads(threads)
        return TorchCalibratedBackend(loaded.module, None, image_shape)
    if name != "onnxruntime":
        raise CalibexportError(f"unknown backend {name!r}; valid backends: onnxruntime, torch.")
    from calibexport.exporter.onnx_export import export_onnx
    from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend

    path = work_dir / "network.onnx"
    if context.is_main and not path.is_file():
        export_options = {"exporter": exporter} if exporter else {}
        export_onnx(loaded.module, path, image_shape=image_shape, **export_options)
    context.barrier()
    return OnnxRuntimeBackend(path, intra_op_threads=threads)


def _feature_functions(spaces: Sequence[str], classifier: Path | None,
                       image_shape: tuple[int, int, int]) -> dict[str, FeatureFn]:
    functions: dict[str, FeatureFn] = {}
    for space in spaces:
        if space == "pixel":
            functions[space] = pixel_features
        elif space == "classifier":
            from calibexport.evaluation.classifier import (
                DEFAULT_CLASSIFIER,
                RESOLUTION,
                classifier_features,
                load_classifier,
            )

            if image_shape != (1, RESOLUTION, RESOLUTION):
                raise CalibexportError(
                    f"the digits classifier takes 1x{RESOLUTION}x{RESOLUTION} images but the "
                    f"model makes {'x'.join(map(str, image_shape))}; use --features pixel."
                )
            module = load_classifier(classifier or DEFAULT_CLASSIFIER)
            functions[space] = lambda images, m=module: classifier_features(
                m, np.clip(images, -1.0, 1.0)
            )
        else:
            raise CalibexportError(
                f"unknown feature space {space!r}; valid feature spaces: classifier, pixel."
            )
    return functions


def _log_plan(options: EvaluationOptions, context: RankContext) -> None:
    configs = options.configs()
    logger.info(
        "Evaluating %d configs (%d distinct sample sets) x %d variants x %d seeds x %d samples: "
        "%d network evaluations on %d rank(s).", len(configs), len(unique_sample_sets(configs)),
        len(options.calibrated_flags()), len(options.seeds), options.num_samples,
        options.network_evaluations(), context.world_size,
    )


def evaluate_model(
    inputs: ModelInputs,
    options: EvaluationOptions,
    out_dir: Path,
    *,
    backend: str = "onnxruntime",
    feature_spaces: Sequence[str] = ("classifier", "pixel"),
    classifier: Path | None = None,
    threads: int | None = None,
    exporter: str | None = None,
    overwrite: bool = False,
    context: RankContext | None = None,
) -> dict[str, Any]:
    """Load everything, run the evaluation and write the reports into ``out_dir`` after each seed.

    Returns the results of all seeds on rank 0 and an empty dict on other ranks.
    """
    from calibexport.calibration_tables.data import load_data
    from calibexport.evaluation.report import eta_noise_rows, write_outputs
    from calibexport.exporter.build import check_eta_matches_model
    from calibexport.models.loaders import load_model
    from calibexport.runtime.eta_table import load_eta_table
    from calibexport.runtime.schedule import schedule_from_spec

    context = context or RankContext()
    # Check the grid and the variants before anything is loaded.
    options.configs()
    options.calibrated_flags()
    loaded = load_model(inputs.model, config=inputs.config, weights=inputs.weights)
    table = load_eta_table(inputs.eta)
    check_eta_matches_model(table, loaded, inputs.allow_mismatch)
    unet = loaded.spec.unet
    image_shape = (unet.in_channels, unet.resolution, unet.resolution)
    features = _feature_functions(feature_spaces, classifier, image_shape)
    reference = load_data(inputs.data, channels=unet.in_channels, resolution=unet.resolution)

    # Everything that changes the samples; the eta table only changes the calibrated ones,
    # which are cached in a folder named after its digest.
    fingerprint = {
        "model_weights_sha256": loaded.weights_sha256,
        "schedule": loaded.spec.schedule, "backend": backend,
        "num_samples": options.num_samples, "spacing": options.spacing,
        "t_end": options.t_end, "denoise_to_zero": options.denoise_to_zero,
    }
    if context.is_main:
        prepare_work_dir(out_dir, fingerprint, overwrite)
    context.barrier()
    engine = _open_backend(backend, loaded, image_shape, out_dir, context, threads, exporter)
    schedule = schedule_from_spec(loaded.spec.schedule)
    evaluation = Evaluation(engine, table, schedule, reference, features, options, out_dir,
                            context)
    _log_plan(options, context)

    def on_pass(results: dict[str, Any]) -> None:
        results["inputs"] = {**{k: str(v) for k, v in asdict(inputs).items()}, **fingerprint,
                             "eta_sha256": table.sha256, "eta_estimation": _eta_summary(table)}
        standard_error = (table.metadata or {}).get("standard_error") or {}
        # Older sidecars record only the mean standard error per row, not its RMS.
        row_se = standard_error.get("row_rms") or standard_error.get("row_mean")
        results["eta_noise"] = eta_noise_rows(table.values, row_se)
        paths = write_outputs(results, out_dir)
        logger.info("Wrote %s after seeds %s.", ", ".join(map(str, paths)),
                    results["seeds_completed"])

    try:
        return evaluation.run(on_pass)
    finally:
        engine.close()
