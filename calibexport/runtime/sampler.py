"""Sampling from a deployed artifact: one solver loop around any eps backend."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.backends.base import EpsBackend
from calibexport.runtime.noise import initial_noise
from calibexport.runtime.prediction import check_prediction_type, to_eps
from calibexport.runtime.schedule import VPSchedule, schedule_from_spec
from calibexport.runtime.solvers import StepInfo, solve

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt")


def make_eps_fn(
    backend: EpsBackend, schedule: VPSchedule, prediction_type: str | None = None
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Adapt a backend taking the model's timestep to the solver's eps(x, t) in solver time.

    A backend with an integer timestep input gets the nearest integer, with one warning, because
    truncating would shift every step by up to one timestep. An x0 or v output is converted to
    eps with alpha_t and sigma_t at the solver time. ``prediction_type`` None takes the backend's
    ``prediction_type`` attribute, or eps when it has none.
    """
    integer_input = np.issubdtype(backend.timestep_dtype, np.integer)
    if prediction_type is None:
        prediction_type = getattr(backend, "prediction_type", "eps")
    prediction_type = check_prediction_type(prediction_type)
    warned = False

    def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        nonlocal warned
        timestep = schedule.t_to_timestep(t)
        if integer_input:
            rounded = np.rint(timestep)
            if not warned and np.any(rounded != timestep):
                logger.warning(
                    "The model takes integer timesteps; rounding solver times to the nearest step."
                )
                warned = True
            timestep = rounded
        output = backend.eps(x, timestep)
        if prediction_type == "eps":
            return output
        t = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1)
        eps = to_eps(prediction_type, output.astype(np.float64), x, schedule.alpha(t),
                     schedule.sigma(t))
        return eps.astype(output.dtype)

    return eps_fn


class Sampler:
    """DPM-Solver and DDIM sampling around a backend that evaluates the calibrated eps(x, t)."""

    def __init__(self, backend: EpsBackend, schedule: VPSchedule,
                 prediction_type: str = "eps") -> None:
        self.backend = backend
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.image_shape = tuple(backend.image_shape)

    @classmethod
    def from_artifact(
        cls,
        artifact_dir: str | Path,
        backend: str = "onnxruntime",
        *,
        verify: bool = True,
        **backend_options: object,
    ) -> Sampler:
        """Open a build directory's model with the schedule recorded in its manifest.

        ``backend`` is ``onnxruntime`` (CPU), ``onnxruntime-cuda`` or ``tensorrt`` (``model.plan``,
        checked against ``engine.json``); ``backend_options`` go to the backend's constructor.
        """
        from calibexport.runtime.artifact import load_manifest, verify_artifact_files

        artifact_dir = Path(artifact_dir)
        manifest = load_manifest(artifact_dir)
        if verify:
            verify_artifact_files(artifact_dir, manifest)
        schedule = schedule_from_spec(manifest.schedule)
        if backend == "onnxruntime":
            from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend

            engine = OnnxRuntimeBackend(artifact_dir / "model.onnx", **backend_options)
        elif backend == "onnxruntime-cuda":
            from calibexport.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

            engine = OnnxRuntimeCudaBackend(artifact_dir / "model.onnx", **backend_options)
        elif backend == "tensorrt":
            from calibexport.runtime.backends.tensorrt import TensorRTBackend

            engine = TensorRTBackend.from_artifact(artifact_dir, **backend_options)
        else:
            raise CalibexportError(
                f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}."
            )
        return cls(engine, schedule, manifest.prediction_type)

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.backend.close()

    def sample(
        self,
        num_samples: int,
        *,
        steps: int = 20,
        order: int = 3,
        method: str = "singlestep",
        spacing: str = "logSNR",
        seed: int = 0,
        batch_size: int | None = None,
        t_end: float | None = None,
        denoise_to_zero: bool = False,
        callback: Callable[[StepInfo], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Return ``num_samples`` float32 samples [N, C, H, W] (unclipped, data range [-1, 1]).

        Sample i starts from noise seeded by (seed, i), so it does not depend on the batch it
        ran in. ``progress`` is called with the number of finished samples after each batch.
        """
        if num_samples < 1:
            raise CalibexportError(f"num_samples must be >= 1, got {num_samples}.")
        if batch_size is None:
            batch_size = min(num_samples, 64)
        if batch_size < 1:
            raise CalibexportError(f"batch_size must be >= 1, got {batch_size}.")
        eps_fn = make_eps_fn(self.backend, self.schedule, self.prediction_type)
        start = time.perf_counter()
        batches = []
        for first in range(0, num_samples, batch_size):
            indices = np.arange(first, min(first + batch_size, num_samples))
            x_T = initial_noise(seed, indices, self.image_shape)
            batches.append(
                solve(
                    eps_fn,
                    x_T,
                    self.schedule,
                    steps=steps,
                    order=order,
                    method=method,
                    spacing=spacing,
                    t_end=t_end,
                    denoise_to_zero=denoise_to_zero,
                    callback=callback,
                )
            )
            if progress is not None:
                progress(int(indices[-1]) + 1)
        logger.info(
            "Sampled %d images in %.1fs (%s, order %d, %d steps)",
            num_samples,
            time.perf_counter() - start,
            method,
            order,
            steps,
        )
        return np.concatenate(batches, axis=0).astype(np.float32, copy=False)
