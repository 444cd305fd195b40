"""Error statistics between a deployed output and its reference, and the pass/fail rule."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Elementwise rule |actual - reference| <= atol + rtol * |reference|."""

    atol: float
    rtol: float


# Presets per precision and backend. fp32 CPU values sit about 10x above the errors measured on
# the bundled digits model (see docs/validation.md); trajectories accumulate per-step error.
TOLERANCE_PRESETS: dict[str, dict[str, Tolerance]] = {
    "fp32-cpu": {
        "evaluation": Tolerance(atol=1e-4, rtol=1e-4),
        "trajectory": Tolerance(atol=1e-3, rtol=1e-3),
        "samples": Tolerance(atol=1e-3, rtol=1e-3),
    },
}


@dataclass
class ErrorStats:
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    cosine_similarity: float
    nan_count: int
    inf_count: int
    #: Smallest atol that would have passed with the check's rtol (0 when any atol passes).
    smallest_passing_atol: float
    #: Index along the first axis (the sample) holding the largest tolerance violation.
    worst_index: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_stats(actual: np.ndarray, reference: np.ndarray, rtol: float) -> ErrorStats:
    """Compute error statistics in float64; NaN/Inf in ``actual`` are counted, not hidden."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        raise ValueError(f"shape mismatch: {actual.shape} vs {reference.shape}")
    nan_count = int(np.isnan(actual).sum())
    inf_count = int(np.isinf(actual).sum())
    abs_err = np.abs(actual - reference)
    abs_err = np.where(np.isfinite(abs_err), abs_err, np.inf)
    rel_err = abs_err / np.maximum(np.abs(reference), 1e-12)
    excess = abs_err - rtol * np.abs(reference)
    per_sample_excess = excess.reshape(excess.shape[0], -1).max(axis=1)
    a, r = actual.ravel(), reference.ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(r)
    cosine = float(np.dot(a, r) / norm) if norm > 0 and np.isfinite(norm) else float("nan")
    return ErrorStats(
        max_abs=float(abs_err.max()),
        mean_abs=float(abs_err.mean()),
        p99_abs=float(np.percentile(abs_err, 99)),
        max_rel=float(rel_err.max()),
        mean_rel=float(rel_err.mean()),
        p99_rel=float(np.percentile(rel_err, 99)),
        cosine_similarity=cosine,
        nan_count=nan_count,
        inf_count=inf_count,
        smallest_passing_atol=float(max(0.0, excess.max())),
        worst_index=int(np.argmax(per_sample_excess)),
    )


@dataclass
class CheckResult:
    """One parity check: what was compared, its statistics and the verdict."""

    name: str
    level: str
    description: str
    tolerance: Tolerance
    stats: ErrorStats
    worst_timestep: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        s = self.stats
        return s.nan_count == 0 and s.inf_count == 0 and s.smallest_passing_atol <= self.tolerance.atol

    def failure_message(self) -> str:
        where = f" at timestep {self.worst_timestep:g}" if self.worst_timestep is not None else ""
        return (
            f"{self.name}: max abs error {self.stats.max_abs:.3g}{where} exceeds atol {self.tolerance.atol:g} "
            f"+ rtol {self.tolerance.rtol:g} * |reference| (smallest passing atol "
            f"{self.stats.smallest_passing_atol:.3g}; NaN {self.stats.nan_count}, Inf {self.stats.inf_count})"
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
            "details": self.details,
        }


def run_check(name: str, level: str, description: str, actual: np.ndarray, reference: np.ndarray,
              tolerance: Tolerance, timesteps: np.ndarray | None = None,
              details: dict[str, Any] | None = None) -> CheckResult:
    """Compare arrays whose first axis is the sample; ``timesteps`` names each sample's time."""
    stats = error_stats(actual, reference, tolerance.rtol)
    worst = None if timesteps is None else float(np.asarray(timesteps)[stats.worst_index])
    return CheckResult(name, level, description, tolerance, stats, worst, details or {})
