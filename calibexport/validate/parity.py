"""Parity checks of a deployed eps backend against reference outputs, at three levels.

1. Single evaluations over the whole timestep range (every table row, or an evenly spaced grid of
   ``max_rows`` rows), non-integer and out-of-range timesteps, and batches of one sample.
2. The state after every step of full sampling runs, for every solver method and order of the
   runtime, driven by the shared numpy solver ``calibexport.runtime.solvers.solve``.
3. The final samples of those runs, with PSNR.

The reference side is computed once (``compute_reference``) into a ``ReferenceOutputs`` that can
be saved and compared later on another machine (``compare_with_reference``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.backends.base import EpsBackend
from calibexport.runtime.noise import initial_noise
from calibexport.runtime.sampler import make_eps_fn
from calibexport.runtime.schedule import VPSchedule
from calibexport.runtime.solvers import METHODS, StepInfo, count_nfe, solve
from calibexport.validate.compare import CheckResult, Tolerance, run_check

logger = logging.getLogger(__name__)

# Samples lie in [-1, 1], so the peak-to-peak range of PSNR is 2.
PSNR_DATA_RANGE = 2.0


@dataclass(frozen=True)
class SamplingRun:
    """One sampling run: ``steps`` is the number of network evaluations (NFE)."""

    method: str
    order: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.method}_order{self.order}_nfe{self.steps}"


# Every method and order that the runtime's solver offers, one seed each.
FULL_RUNS: tuple[SamplingRun, ...] = (
    SamplingRun("singlestep", 1, 10),
    SamplingRun("singlestep", 2, 10),
    SamplingRun("singlestep", 3, 20),
    SamplingRun("singlestep_fixed", 3, 12),
    SamplingRun("multistep", 1, 10),
    SamplingRun("multistep", 2, 10),
    SamplingRun("multistep", 3, 10),
    SamplingRun("ddim", 1, 10),
)
QUICK_RUNS: tuple[SamplingRun, ...] = (
    SamplingRun("singlestep", 3, 20),
    SamplingRun("multistep", 2, 10),
)
RUN_SETS = {"full": FULL_RUNS, "quick": QUICK_RUNS}


def parse_runs(text: str) -> tuple[SamplingRun, ...]:
    """Parse ``full``, ``quick`` or a comma-separated list of ``METHOD:ORDER:NFE``."""
    if text in RUN_SETS:
        return RUN_SETS[text]
    runs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            method, order, steps = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise CalibexportError(
                f"--runs item {item.strip()!r} is invalid; use full, quick or a comma-separated "
                f"list of METHOD:ORDER:NFE with METHOD one of {', '.join(METHODS)}, e.g. "
                f"singlestep:3:20,ddim:1:10."
            ) from None
        if len(parts) != 3:
            raise CalibexportError(f"--runs item {item.strip()!r} must be METHOD:ORDER:NFE.")
        count_nfe(steps, order, method)
        runs.append(SamplingRun(method, order, steps))
    return tuple(runs)


@dataclass
class ParityConfig:
    """Parity inputs, sampling runs and tolerances."""

    tolerances: dict[str, Tolerance]
    tolerance_preset: str
    tolerance_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    batch_size: int = 8
    num_non_integer: int = 64
    #: Evaluate every row when T is at most this, else an evenly spaced grid of this many rows.
    max_rows: int = 1000
    runs: tuple[SamplingRun, ...] = FULL_RUNS
    #: Samples per sampling run.
    num_samples: int = 4
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_non_integer": self.num_non_integer,
            "max_rows": self.max_rows,
            "runs": [run.name for run in self.runs],
            "num_samples": self.num_samples,
            "seed": self.seed,
        }


@dataclass
class EvaluationCase:
    """Inputs of one single-evaluation check and, once computed, the reference eps."""

    name: str
    description: str
    batch_size: int
    timesteps: np.ndarray
    x: np.ndarray
    eps: np.ndarray | None = None

    def batches(self) -> list[slice]:
        starts = range(0, len(self.timesteps), self.batch_size)
        return [slice(i, i + self.batch_size) for i in starts]


@dataclass
class TrajectoryRecord:
    """A sampling run of the reference: the state after each step and the final sample."""

    run: SamplingRun
    x_T: np.ndarray
    #: Solver time at the end of each step, [S].
    step_t: np.ndarray
    #: State after each step, [S, B, C, H, W].
    states: np.ndarray
    final: np.ndarray


@dataclass
class ModelCall:
    """One network evaluation inside a reference sampling run, kept for Polygraphy files."""

    label: str
    x: np.ndarray
    timestep: np.ndarray
    eps: np.ndarray


@dataclass
class ReferenceOutputs:
    """Everything the deployed side is compared with; serialisable by ``reference_file``."""

    source: dict[str, Any]
    evaluations: list[EvaluationCase]
    trajectories: list[TrajectoryRecord]
    seed: int
    num_samples: int
    calls: list[ModelCall] = field(default_factory=list)


@dataclass
class ParityResult:
    checks: list[CheckResult]
    config: dict[str, Any]
    seconds: float
    reference: ReferenceOutputs
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


class _RecordingBackend(EpsBackend):
    """Pass calls to ``inner`` and keep each call's inputs and output."""

    def __init__(self, inner: EpsBackend, label: str, calls: list[ModelCall]) -> None:
        self.inner = inner
        self.name = inner.name
        self.image_shape = inner.image_shape
        self.timestep_dtype = inner.timestep_dtype
        self.label = label
        self.calls = calls

    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        eps = self.inner.eps(x, timestep)
        self.calls.append(ModelCall(self.label, x.copy(), timestep.copy(), np.array(eps)))
        return eps


def plan_evaluations(num_timesteps: int, image_shape: tuple[int, ...], integer_timesteps: bool,
                     config: ParityConfig) -> list[EvaluationCase]:
    """Choose the timesteps and inputs of the single-evaluation checks (x seeded per sample)."""
    rng = np.random.default_rng(config.seed)
    last = num_timesteps - 1
    rows = np.arange(num_timesteps, dtype=np.float64)
    if num_timesteps > config.max_rows:
        rows = np.unique(np.round(np.linspace(0, last, config.max_rows)))
    # A permutation puts different timesteps side by side in every batch.
    rows = rows[rng.permutation(len(rows))]
    grid = "every row" if len(rows) == num_timesteps else f"{len(rows)} evenly spaced rows"
    specs = [("evaluation/integer_timesteps", f"{grid} of 0..{last}, batch {config.batch_size}, "
              "a different timestep per sample", rows, config.batch_size)]
    if not integer_timesteps:
        fractional = np.concatenate(
            [rng.uniform(0, last, config.num_non_integer), [0.0, float(last), 0.5, last - 0.5]]
        )
        specs.append(("evaluation/non_integer_timesteps", f"{len(fractional)} non-integer "
                      "timesteps and both ends of the table", fractional, config.batch_size))
        outside = np.array([-1.0, -0.25, last + 0.25, last + 1.0])
        specs.append(("evaluation/out_of_range_timesteps", "timesteps outside the table, where "
                      "eta is clamped to the first or last row", outside, 2))
    singles = np.array([0.0, float(last // 2), float(last)])
    specs.append(("evaluation/batch_1", "batch of one sample at the first, middle and last "
                  "timestep", singles, 1))

    cases = []
    offset = 0
    for name, description, timesteps, batch_size in specs:
        # Each case draws x for its own sample indices, so no two cases share an input.
        x = initial_noise(config.seed, np.arange(offset, offset + len(timesteps)), image_shape)
        offset += len(timesteps)
        cases.append(EvaluationCase(name, description, batch_size, timesteps, x))
    return cases


def _evaluate(backend: EpsBackend, case: EvaluationCase) -> np.ndarray:
    return np.concatenate([backend.eps(case.x[b], case.timesteps[b]) for b in case.batches()])


def _trajectory(backend: EpsBackend, schedule: VPSchedule, x_T: np.ndarray,
                run: SamplingRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``run`` from ``x_T``; return (step end times [S], states [S, ...], final sample)."""
    infos: list[StepInfo] = []
    final = solve(make_eps_fn(backend, schedule), x_T.copy(), schedule, steps=run.steps,
                  order=run.order, method=run.method, callback=infos.append)
    step_t = np.array([info.t for info in infos], dtype=np.float64)
    return step_t, np.stack([info.x for info in infos]), final


def compute_reference(reference: EpsBackend, schedule: VPSchedule, cases: list[EvaluationCase],
                      config: ParityConfig, record_calls: bool = False) -> ReferenceOutputs:
    """Evaluate the reference on every case and sampling run of ``config``."""
    start = time.perf_counter()
    for case in cases:
        case.eps = _evaluate(reference, case)
    x_T = initial_noise(config.seed, np.arange(config.num_samples), reference.image_shape)
    calls: list[ModelCall] = []
    trajectories = []
    for run in config.runs:
        backend = _RecordingBackend(reference, f"trajectory/{run.name}", calls) if record_calls \
            else reference
        step_t, states, final = _trajectory(backend, schedule, x_T, run)
        trajectories.append(TrajectoryRecord(run, x_T, step_t, states, final))
    logger.info("Computed the %s reference outputs in %.1fs", reference.name,
                time.perf_counter() - start)
    source = {"backend": reference.name}
    return ReferenceOutputs(source, cases, trajectories, config.seed, config.num_samples, calls)


def _evaluation_check(deployed: EpsBackend, case: EvaluationCase,
                      tolerance: Tolerance) -> CheckResult:
    actual = _evaluate(deployed, case)
    assert case.eps is not None, "compute_reference fills the reference eps"
    check = run_check(case.name, "evaluation", case.description, actual, case.eps, tolerance,
                      case.timesteps)

    # The five timesteps with the largest errors, so that one bad row is visible among the rest.
    per_sample = np.abs(actual.astype(np.float64) - case.eps).reshape(len(actual), -1).max(axis=1)
    order = np.argsort(-np.nan_to_num(per_sample, nan=np.inf))[:5]
    check.details["largest_errors"] = [
        {"timestep": float(case.timesteps[i]), "max_abs": float(per_sample[i])} for i in order
    ]
    return check


def _step_interval(schedule: VPSchedule, step_t: np.ndarray, step: int) -> dict[str, Any]:
    """Describe step ``step`` (0-based) by its model timesteps at start and end."""
    start_t = schedule.t_max if step == 0 else step_t[step - 1]
    times = schedule.t_to_timestep(np.array([start_t, step_t[step]], dtype=np.float64))
    return {"step": step + 1, "from_timestep": float(times[0]), "to_timestep": float(times[1])}


def _trajectory_details(schedule: VPSchedule, step_t: np.ndarray, states: np.ndarray,
                        reference: np.ndarray, tolerance: Tolerance) -> dict[str, Any]:
    """Describe the per-step error: its size, the first failing step and the largest growth.

    Errors accumulate over a run, so the largest one usually sits at the end. The step where the
    error grew the most points at the evaluation that introduced it.
    """
    diff = np.abs(states.astype(np.float64) - reference)
    per_step = np.nan_to_num(diff.reshape(len(states), -1).max(axis=1), nan=np.inf)
    growth = np.nan_to_num(np.diff(np.concatenate([[0.0], per_step])), nan=-np.inf)
    growth_step = int(np.argmax(growth))
    growth_info = _step_interval(schedule, step_t, growth_step)
    growth_info["growth"] = float(growth[growth_step])

    excess = (diff - tolerance.rtol * np.abs(reference)).reshape(len(states), -1).max(axis=1)
    failing = np.flatnonzero(np.nan_to_num(excess, nan=np.inf) > tolerance.atol)
    first_failing = None if not len(failing) else _step_interval(schedule, step_t, int(failing[0]))

    details = {
        "per_step_max_abs": per_step.tolist(),
        "step_timesteps": schedule.t_to_timestep(step_t).tolist(),
        "first_failing_step": first_failing,
        "largest_growth_step": growth_info,
    }
    if first_failing is not None:
        details["failure_hint"] = (
            f"The state first exceeded the tolerance after step {first_failing['step']} "
            f"(timesteps {first_failing['from_timestep']:g} to {first_failing['to_timestep']:g})."
        )
    return details


def _samples_check(run: SamplingRun, final: np.ndarray, reference: np.ndarray,
                   tolerance: Tolerance, growth_info: dict[str, Any]) -> CheckResult:
    mse = float(np.mean((final.astype(np.float64) - reference) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(PSNR_DATA_RANGE**2 / mse)
    hint = (f"The sampling error grew most in step {growth_info['step']} (timesteps "
            f"{growth_info['from_timestep']:g} to {growth_info['to_timestep']:g}).")
    samples = run_check(f"samples/{run.name}", "samples", f"final samples of the {run.name} run",
                        final, reference, tolerance,
                        details={"psnr_db": psnr, "largest_growth_step": growth_info,
                                 "failure_hint": hint})
    samples.details["worst_sample"] = samples.stats.worst_index
    samples.worst_timestep = growth_info["to_timestep"]
    samples.worst_timestep_rule = "end timestep of the step where the state error grew the most"
    return samples


def _sampling_checks(deployed: EpsBackend, schedule: VPSchedule, record: TrajectoryRecord,
                     tolerances: dict[str, Tolerance], num_samples: int) -> list[CheckResult]:
    run = record.run
    step_t, states, final = _trajectory(deployed, schedule, record.x_T, run)
    if states.shape != record.states.shape:
        raise CalibexportError(
            f"the {run.name} run made {len(states)} steps but the reference made "
            f"{len(record.states)}; the reference was computed with another solver release."
        )
    details = _trajectory_details(schedule, step_t, states, record.states,
                                  tolerances["trajectory"])
    description = (f"state after each of the {len(states)} steps of {run.method} order "
                   f"{run.order} with {run.steps} evaluations, {num_samples} samples")
    trajectory = run_check(f"trajectory/{run.name}", "trajectory", description, states,
                           record.states, tolerances["trajectory"],
                           np.asarray(details["step_timesteps"]), details)
    trajectory.worst_timestep_rule = "end timestep of the step with the largest tolerance violation"
    samples = _samples_check(run, final, record.final, tolerances["samples"],
                             details["largest_growth_step"])
    return [trajectory, samples]


def compare_with_reference(deployed: EpsBackend, schedule: VPSchedule,
                           reference: ReferenceOutputs, config: ParityConfig) -> ParityResult:
    """Run the deployed backend on the reference's inputs and compare at all three levels."""
    start = time.perf_counter()
    logger.info("Comparing %s with the %s reference outputs ...", deployed.name,
                reference.source.get("backend"))
    checks = [_evaluation_check(deployed, case, config.tolerances["evaluation"])
              for case in reference.evaluations]
    for record in reference.trajectories:
        checks += _sampling_checks(deployed, schedule, record, config.tolerances,
                                   reference.num_samples)
    # Trajectory and samples checks of one run sit together above; order them by level.
    levels = ("evaluation", "trajectory", "samples")
    checks.sort(key=lambda check: levels.index(check.level))
    seconds = time.perf_counter() - start
    failed = [check.name for check in checks if not check.passed]
    logger.info("Validation %s in %.1fs (%d checks%s)", "FAILED" if failed else "passed",
                seconds, len(checks), f", failed: {', '.join(failed)}" if failed else "")
    return ParityResult(checks, config.to_dict(), seconds, reference)


def run_parity(deployed: EpsBackend, reference: EpsBackend, schedule: VPSchedule,
               num_timesteps: int, config: ParityConfig,
               record_calls: bool = False) -> ParityResult:
    """Compute the reference outputs, then compare the deployed backend with them."""
    start = time.perf_counter()
    integer = np.issubdtype(deployed.timestep_dtype, np.integer)
    cases = plan_evaluations(num_timesteps, deployed.image_shape, integer, config)
    outputs = compute_reference(reference, schedule, cases, config, record_calls)
    result = compare_with_reference(deployed, schedule, outputs, config)
    result.seconds = time.perf_counter() - start
    return result
