"""Error statistics between a deployed output and its reference, and the pass/fail rule.

An element passes when ``|actual - reference| <= atol + rtol * |reference|`` and both values are
finite. A check passes when every element passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError

LEVELS = ("evaluation", "trajectory", "samples")

# Denominator floor of the relative error, so a reference value of exactly 0 gives a large but
# finite relative error.
REL_FLOOR = 1e-12


@dataclass(frozen=True)
class Tolerance:
    """Elementwise rule |actual - reference| <= atol + rtol * |reference|."""

    atol: float
    rtol: float


# Presets per precision and backend; docs/validation.md lists the errors measured behind them.
# Trajectories and samples accumulate the per-evaluation error over a whole sampling run.
TOLERANCE_PRESETS: dict[str, dict[str, Tolerance]] = {
    # ONNX Runtime CPU against eager PyTorch CPU, both float32.
    "fp32-cpu": {
        "evaluation": Tolerance(atol=1e-4, rtol=1e-4),
        "trajectory": Tolerance(atol=1e-3, rtol=1e-3),
        "samples": Tolerance(atol=1e-3, rtol=1e-3),
    },
    # NOTE: estimated, not measured on a GPU: float32 GPU kernels with TF32 off, against the CPU
    # reference. TF32 on adds about 1e-3 per evaluation and needs looser tolerances.
    "fp32-gpu": {
        "evaluation": Tolerance(atol=5e-4, rtol=5e-4),
        "trajectory": Tolerance(atol=5e-3, rtol=5e-3),
        "samples": Tolerance(atol=5e-3, rtol=5e-3),
    },
    # A float16 network (normalization statistics, softmax and the eta subtraction in float32)
    # against the float32 reference.
    "fp16": {
        "evaluation": Tolerance(atol=1e-2, rtol=1e-2),
        "trajectory": Tolerance(atol=1e-1, rtol=5e-2),
        "samples": Tolerance(atol=1e-1, rtol=5e-2),
    },
}


def preset_tolerances(preset: str) -> dict[str, Tolerance]:
    """Return a copy of the tolerances of ``preset``; raise CalibexportError for an unknown one."""
    if preset not in TOLERANCE_PRESETS:
        raise CalibexportError(
            f"unknown tolerance preset {preset!r}; valid presets: auto, "
            f"{', '.join(TOLERANCE_PRESETS)}."
        )
    return dict(TOLERANCE_PRESETS[preset])


def parse_tolerance_override(text: str, flag: str) -> tuple[tuple[str, ...], float]:
    """Parse ``VALUE`` (every level) or ``LEVEL=VALUE`` into (levels, value).

    ``flag`` names the option in the error message.
    """
    level, _, value_text = text.rpartition("=")
    levels = LEVELS if not level else (level.strip(),)
    if levels[0] not in LEVELS:
        raise CalibexportError(
            f"{flag} {text!r} names an unknown level {level!r}; use VALUE or LEVEL=VALUE with "
            f"LEVEL one of {', '.join(LEVELS)}."
        )
    try:
        value = float(value_text)
    except ValueError:
        raise CalibexportError(
            f"{flag} {text!r} is not a number; use VALUE or LEVEL=VALUE, e.g. {flag} 1e-4 or "
            f"{flag} trajectory=1e-3."
        ) from None
    if not math.isfinite(value) or value < 0:
        raise CalibexportError(f"{flag} {text!r} must be a finite number >= 0.")
    return levels, value


def apply_overrides(
    tolerances: dict[str, Tolerance], atol: list[str], rtol: list[str]
) -> tuple[dict[str, Tolerance], dict[str, dict[str, float]]]:
    """Apply ``--atol``/``--rtol`` texts in order; return the tolerances and the overrides made."""
    result = dict(tolerances)
    overrides: dict[str, dict[str, float]] = {}
    for texts, key in ((atol, "atol"), (rtol, "rtol")):
        for text in texts:
            levels, value = parse_tolerance_override(text, f"--{key}")
            for level in levels:
                old = result[level]
                result[level] = Tolerance(
                    atol=value if key == "atol" else old.atol,
                    rtol=value if key == "rtol" else old.rtol,
                )
                overrides.setdefault(level, {})[key] = value
    return result, overrides


@dataclass
class ErrorStats:
    """Error statistics of one check, computed in float64 over the elements where both are finite.

    ``smallest_passing_atol`` is the smallest atol that passes with the check's rtol, and
    ``smallest_passing_rtol`` the smallest rtol that passes with the check's atol. Both are inf
    when no tolerance passes (a NaN or Inf in the output, or a reference of 0 for the rtol).
    ``worst_index`` is the index along the first axis with the largest tolerance violation.
    """

    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    cosine_similarity: float
    nan_count: int
    inf_count: int
    reference_nonfinite_count: int
    smallest_passing_atol: float
    smallest_passing_rtol: float
    worst_index: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cosine(actual: np.ndarray, reference: np.ndarray) -> float:
    norm = float(np.linalg.norm(actual) * np.linalg.norm(reference))
    if norm == 0.0:
        # Two zero arrays agree exactly; one zero array against a non-zero one has no direction.
        return 1.0 if not actual.any() and not reference.any() else 0.0
    return float(np.dot(actual, reference) / norm)


def error_stats(actual: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> ErrorStats:
    """Compute the statistics of ``actual`` against ``reference`` (first axis: sample or step)."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        raise CalibexportError(
            f"output shape {list(actual.shape)} differs from the reference shape "
            f"{list(reference.shape)}."
        )
    finite = np.isfinite(actual) & np.isfinite(reference)
    abs_err = np.abs(actual - reference)
    abs_err[~finite] = 0.0
    magnitude = np.abs(np.where(finite, reference, 0.0))
    rel_err = abs_err / np.maximum(magnitude, REL_FLOOR)

    # Excess over the rtol part of the rule: the atol this element needs. Non-finite: never passes.
    excess = np.where(finite, abs_err - tolerance.rtol * magnitude, np.inf)
    per_row_excess = excess.reshape(excess.shape[0], -1).max(axis=1)
    over_atol = np.where(finite, abs_err - tolerance.atol, np.inf)
    failing = over_atol > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        needed_rtol = np.where(failing, over_atol / magnitude, 0.0)
    needed_rtol = np.where(np.isnan(needed_rtol), np.inf, needed_rtol)

    abs_finite = abs_err[finite]
    rel_finite = rel_err[finite]
    empty = abs_finite.size == 0
    return ErrorStats(
        max_abs=0.0 if empty else float(abs_finite.max()),
        mean_abs=0.0 if empty else float(abs_finite.mean()),
        p99_abs=0.0 if empty else float(np.percentile(abs_finite, 99)),
        max_rel=0.0 if empty else float(rel_finite.max()),
        mean_rel=0.0 if empty else float(rel_finite.mean()),
        p99_rel=0.0 if empty else float(np.percentile(rel_finite, 99)),
        cosine_similarity=_cosine(np.where(finite, actual, 0.0).ravel(),
                                  np.where(finite, reference, 0.0).ravel()),
        nan_count=int(np.isnan(actual).sum()),
        inf_count=int(np.isinf(actual).sum()),
        reference_nonfinite_count=int((~np.isfinite(reference)).sum()),
        smallest_passing_atol=float(max(0.0, excess.max())),
        smallest_passing_rtol=float(needed_rtol.max()),
        worst_index=int(np.argmax(per_row_excess)),
    )


@dataclass
class CheckResult:
    """One parity check: what was compared, its statistics and the verdict.

    ``worst_timestep`` is the model input time the largest error belongs to, by the rule in
    ``worst_timestep_rule``; None when the check has no timestep.
    """

    name: str
    level: str
    description: str
    tolerance: Tolerance
    stats: ErrorStats
    worst_timestep: float | None = None
    worst_timestep_rule: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        s = self.stats
        finite = s.nan_count == 0 and s.inf_count == 0 and s.reference_nonfinite_count == 0
        return finite and s.smallest_passing_atol <= self.tolerance.atol

    def failure_message(self) -> str:
        """Name the check, the worst timestep, the error and the tolerance that would pass."""
        s = self.stats
        where = "" if self.worst_timestep is None else f" at timestep {self.worst_timestep:g}"
        if s.nan_count or s.inf_count or s.reference_nonfinite_count:
            return (
                f"{self.name}: non-finite values{where}: NaN {s.nan_count}, Inf {s.inf_count} "
                f"in the output, {s.reference_nonfinite_count} in the reference; no tolerance "
                f"passes."
            )
        hint = self.details.get("failure_hint", "")
        return (
            f"{self.name}: max abs error {s.max_abs:.3g}{where} exceeds atol "
            f"{self.tolerance.atol:g} + rtol {self.tolerance.rtol:g} * |reference|; the "
            f"smallest passing atol is {s.smallest_passing_atol:.3g} (or rtol "
            f"{s.smallest_passing_rtol:.3g}).{' ' + hint if hint else ''}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": self.level,
            "description": self.description,
            "passed": self.passed,
            "tolerance": asdict(self.tolerance),
            "stats": self.stats.to_dict(),
            "worst_timestep": self.worst_timestep,
            "worst_timestep_rule": self.worst_timestep_rule,
            "failure_message": None if self.passed else self.failure_message(),
            "details": self.details,
        }


def run_check(
    name: str,
    level: str,
    description: str,
    actual: np.ndarray,
    reference: np.ndarray,
    tolerance: Tolerance,
    timesteps: np.ndarray | None = None,
    details: dict[str, Any] | None = None,
) -> CheckResult:
    """Compare arrays whose first axis is the sample; ``timesteps`` gives each sample's time.

    The worst timestep is the time of the sample with the largest tolerance violation.
    """
    stats = error_stats(actual, reference, tolerance)
    worst = None
    rule = ""
    if timesteps is not None:
        worst = float(np.asarray(timesteps)[stats.worst_index])
        rule = "timestep of the sample with the largest tolerance violation"
    return CheckResult(name, level, description, tolerance, stats, worst, rule, details or {})
