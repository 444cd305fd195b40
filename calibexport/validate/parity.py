"""Parity checks of a deployed eps backend against the PyTorch calibrated reference.

Three levels: single evaluations over the whole timestep range, the per-step trajectory of full
sampling runs driven by the same solver loop, and the final samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibexport.runtime.backends.base import EpsBackend
from calibexport.runtime.noise import initial_noise
from calibexport.runtime.sampler import make_eps_fn
from calibexport.runtime.schedule import VPSchedule
from calibexport.runtime.solvers import StepInfo, solve
from calibexport.validate.compare import CheckResult, Tolerance, run_check

logger = logging.getLogger(__name__)

# (method, order, steps) of the sampling runs compared step by step.
DEFAULT_RUNS: tuple[tuple[str, int, int], ...] = (("singlestep", 3, 20), ("multistep", 2, 10))


@dataclass
class ParityConfig:
    tolerances: dict[str, Tolerance]
    tolerance_preset: str
    batch_size: int = 8
    num_non_integer: int = 64
    #: Evaluate every row when T is at most this, else an evenly spaced grid of this many rows.
    max_rows: int = 1000
    runs: tuple[tuple[str, int, int], ...] = DEFAULT_RUNS
    num_samples: int = 4
    seed: int = 0


@dataclass
class ParityResult:
    checks: list[CheckResult]
    config: dict[str, Any]
    seconds: float
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


def _evaluate_pairs(deployed: EpsBackend, reference: EpsBackend, timesteps: np.ndarray, batch_size: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate both backends on the same x (seeded per sample) at one timestep per sample."""
    outputs, references = [], []
    for first in range(0, len(timesteps), batch_size):
        t = timesteps[first:first + batch_size]
        x = initial_noise(seed, np.arange(first, first + len(t)), deployed.image_shape)
        outputs.append(deployed.eps(x, t))
        references.append(reference.eps(x, t))
    return np.concatenate(outputs), np.concatenate(references)


def _evaluation_checks(deployed: EpsBackend, reference: EpsBackend, num_timesteps: int,
                       config: ParityConfig) -> list[CheckResult]:
    tolerance = config.tolerances["evaluation"]
    rng = np.random.default_rng(config.seed)
    last = num_timesteps - 1
    integer_deployed = np.issubdtype(deployed.timestep_dtype, np.integer)

    rows = np.arange(num_timesteps, dtype=np.float64)
    if num_timesteps > config.max_rows:
        rows = np.unique(np.round(np.linspace(0, last, config.max_rows)))
    # A permutation puts different timesteps side by side in every batch.
    rows = rows[rng.permutation(len(rows))]
    cases = [("evaluation/integer_timesteps", f"{len(rows)} integer timesteps in 0..{last}, batch "
              f"{config.batch_size}, a different timestep per sample", rows, config.batch_size)]
    if not integer_deployed:
        fractional = np.concatenate([rng.uniform(0, last, config.num_non_integer), [0.0, last, 0.5, last - 0.5]])
        cases.append(("evaluation/non_integer_timesteps", f"{len(fractional)} non-integer timesteps and "
                      "both ends of the table", fractional, config.batch_size))
        outside = np.array([-1.0, -0.25, last + 0.25, last + 1.0])
        cases.append(("evaluation/out_of_range_timesteps", "timesteps outside the table, where eta is "
                      "clamped to the first or last row", outside, 2))
    singles = np.array([0.0, float(last // 2), float(last)])
    cases.append(("evaluation/batch_1", "batch of one sample at the first, middle and last timestep", singles, 1))

    checks = []
    for name, description, timesteps, batch_size in cases:
        actual, expected = _evaluate_pairs(deployed, reference, timesteps, batch_size, config.seed)
        checks.append(run_check(name, "evaluation", description, actual, expected, tolerance, timesteps))
    return checks


def _trajectory(backend: EpsBackend, schedule: VPSchedule, x_T: np.ndarray, method: str, order: int,
                steps: int) -> tuple[np.ndarray, list[StepInfo]]:
    infos: list[StepInfo] = []

    def record(info: StepInfo) -> None:
        infos.append(StepInfo(info.step, info.t, info.x.copy(), info.nfe))

    final = solve(make_eps_fn(backend, schedule), x_T, schedule, steps=steps, order=order, method=method,
                  callback=record)
    return final, infos


def _sampling_checks(deployed: EpsBackend, reference: EpsBackend, schedule: VPSchedule,
                     config: ParityConfig) -> list[CheckResult]:
    checks = []
    x_T = initial_noise(config.seed, np.arange(config.num_samples), deployed.image_shape)
    for method, order, steps in config.runs:
        run = f"{method}_order{order}_nfe{steps}"
        final, steps_out = _trajectory(deployed, schedule, x_T, method, order, steps)
        final_ref, steps_ref = _trajectory(reference, schedule, x_T, method, order, steps)

        # Stack the states step by step: axis 0 is the step, so the worst index names the step.
        actual = np.stack([info.x for info in steps_out])
        expected = np.stack([info.x for info in steps_ref])
        step_times = np.array([schedule.t_to_timestep(info.t) for info in steps_out])
        per_step = np.abs(actual - expected).reshape(len(actual), -1).max(axis=1)
        trajectory = run_check(
            f"trajectory/{run}", "trajectory", f"state after each of the {len(actual)} steps of {method} "
            f"DPM-Solver order {order} with {steps} evaluations, {config.num_samples} samples",
            actual, expected, config.tolerances["trajectory"], step_times,
            details={"per_step_max_abs": per_step.tolist(), "step_timesteps": step_times.tolist()},
        )
        checks.append(trajectory)

        peak = 2.0  # data range [-1, 1]
        mse = float(np.mean((final.astype(np.float64) - final_ref) ** 2))
        psnr = float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)
        checks.append(run_check(
            f"samples/{run}", "samples", f"final samples of the {run} run", final, final_ref,
            config.tolerances["samples"], details={"psnr_db": psnr},
        ))
    return checks


def run_parity(deployed: EpsBackend, reference: EpsBackend, schedule: VPSchedule, num_timesteps: int,
               config: ParityConfig) -> ParityResult:
    """Run every check; the result is serialisable and says which timestep was worst."""
    start = time.perf_counter()
    logger.info("Validating %s against %s ...", deployed.name, reference.name)
    checks = _evaluation_checks(deployed, reference, num_timesteps, config)
    checks += _sampling_checks(deployed, reference, schedule, config)
    seconds = time.perf_counter() - start
    result = ParityResult(checks, _config_dict(config), seconds)
    failed = [check.name for check in checks if not check.passed]
    logger.info("Validation %s in %.1fs (%d checks%s)", "FAILED" if failed else "passed", seconds, len(checks),
                f", failed: {', '.join(failed)}" if failed else "")
    return result


def _config_dict(config: ParityConfig) -> dict[str, Any]:
    return {
        "tolerance_preset": config.tolerance_preset,
        "tolerances": {level: vars(tol) for level, tol in config.tolerances.items()},
        "batch_size": config.batch_size,
        "num_non_integer": config.num_non_integer,
        "max_rows": config.max_rows,
        "runs": [list(run) for run in config.runs],
        "num_samples": config.num_samples,
        "seed": config.seed,
    }
