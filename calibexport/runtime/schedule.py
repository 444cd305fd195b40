"""Variance-preserving noise schedules: the one place where alpha_t, sigma_t and lambda_t live.

Notation follows DPM-Solver (Lu et al., NeurIPS 2022): ``x_t = alpha_t x_0 + sigma_t e`` with
``alpha_t^2 + sigma_t^2 = 1``, ``lambda_t = log(alpha_t) - log(sigma_t)`` (half the log-SNR),
and ``t`` the solver's continuous time in (0, 1]. ``timestep`` is the network's own input time.

Two schedules are offered:

* ``DiscreteVPSchedule``: a network trained on N discrete steps with ``betas``. Following the
  reference DPM-Solver code, ``t_n = (n + 1) / N`` and ``log_alpha(t)`` is the piecewise-linear
  interpolation through ``(t_n, log_alpha[n])``, extrapolated linearly outside ``[1/N, 1]``.
  The network input time is ``(t - 1/N) * N``, so ``t_n`` maps to the integer step ``n``.
* ``LinearVPSchedule``: the continuous schedule ``beta(t) = beta_0 + t (beta_1 - beta_0)``.

Every function takes and returns float64 numpy arrays; step coefficients are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibexport.errors import CalibexportError

SCHEDULE_KINDS = ("discrete", "linear")


def _interp_extrapolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Interpolate piecewise linearly through (xp, fp), extrapolating the end segments.

    ``xp`` must be increasing. Unlike ``np.interp``, values outside ``[xp[0], xp[-1]]`` follow the
    line through the two nearest points instead of being clamped.
    """
    x = np.asarray(x, dtype=np.float64)
    # np.minimum/np.maximum instead of np.clip, which costs several times more on the few
    # elements of one solver step.
    idx = np.minimum(np.maximum(np.searchsorted(xp, x, side="right") - 1, 0), len(xp) - 2)
    x0, x1 = xp[idx], xp[idx + 1]
    y0, y1 = fp[idx], fp[idx + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def sigma_from_log_alpha(log_alpha: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt(1 - alpha_t^2), from log(alpha_t)."""
    return np.sqrt(-np.expm1(2.0 * log_alpha))


def lambda_from_log_alpha(log_alpha: np.ndarray) -> np.ndarray:
    """lambda_t = log(alpha_t) - log(sigma_t), from log(alpha_t)."""
    return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))


def linear_betas(beta_start: float, beta_end: float, num_timesteps: int) -> np.ndarray:
    """Return the DDPM linear beta schedule in float64."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


class VPSchedule:
    """Interface shared by the schedules: marginal coefficients and the time conversions.

    The solvers cache their step plans on the schedule object. Setting any attribute drops
    them. Changing an array attribute in place does not, so replace arrays instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name != "_solver_plans":
            self.__dict__.pop("_solver_plans", None)

    kind: str
    t_max: float = 1.0
    default_t_end: float = 1e-3

    def log_alpha(self, t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def inverse_lambda(self, lambda_t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def t_to_timestep(self, t: np.ndarray) -> np.ndarray:
        """Convert solver time t to the network's input time (float64, not rounded)."""
        raise NotImplementedError

    def timestep_to_t(self, timestep: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def alpha(self, t: np.ndarray) -> np.ndarray:
        return np.exp(self.log_alpha(t))

    def sigma(self, t: np.ndarray) -> np.ndarray:
        return sigma_from_log_alpha(self.log_alpha(t))

    def lambda_(self, t: np.ndarray) -> np.ndarray:
        """Half log-SNR: log(alpha_t) - log(sigma_t)."""
        return lambda_from_log_alpha(self.log_alpha(t))

    def check_t_end(self, t_end: float) -> None:
        """Raise unless 0 < t_end < t_max and sigma(t_end) > 0, so lambda is finite."""
        if not (0.0 < t_end < self.t_max):
            raise CalibexportError(
                f"t_end={t_end} is outside the schedule's time range (0, {self.t_max}); "
                f"use a value such as {self.default_t_end}."
            )
        # A schedule extrapolated below its first step can reach log_alpha >= 0 there; the
        # NaN or inf that lambda then takes is reported below, so numpy's warning is silenced.
        with np.errstate(invalid="ignore", divide="ignore"):
            lambda_end = self.lambda_(np.array(t_end))
        if not np.isfinite(lambda_end):
            log_alpha_end = float(self.log_alpha(np.array(t_end)))
            raise CalibexportError(
                f"t_end={t_end} gives log_alpha={log_alpha_end!r} on this schedule, so sigma_t is "
                f"not positive and lambda is undefined there; use a larger t_end such as "
                f"{self.default_t_end}."
            )


@dataclass
class DiscreteVPSchedule(VPSchedule):
    """VP schedule of a network trained on N discrete steps (DDPM/DDIM)."""

    betas: np.ndarray
    spec: dict[str, Any] = field(default_factory=dict)
    kind: str = "discrete"

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise CalibexportError(
                f"betas must be a 1-D array with at least 2 entries, got shape {betas.shape}."
            )
        if not np.all((betas > 0) & (betas < 1)):
            raise CalibexportError("every beta must lie in (0, 1).")
        self.betas = betas
        self.num_timesteps = len(betas)
        # The reference DPM-Solver code sums log(1 - beta) in the betas' precision and stores
        # log_alpha as float32; doing the same keeps lambda within 1e-7 of its values.
        log_alpha = 0.5 * np.cumsum(np.log1p(-betas))
        self.log_alpha_array = log_alpha.astype(np.float32).astype(np.float64)
        self.t_array = np.linspace(0.0, 1.0, self.num_timesteps + 1, dtype=np.float64)[1:]
        self.default_t_end = 1.0 / self.num_timesteps

    @classmethod
    def linear(
        cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000
    ) -> DiscreteVPSchedule:
        spec = {
            "kind": "discrete",
            "beta_schedule": "linear",
            "beta_start": beta_start,
            "beta_end": beta_end,
            "num_timesteps": num_timesteps,
        }
        return cls(betas=linear_betas(beta_start, beta_end, num_timesteps), spec=spec)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray) -> DiscreteVPSchedule:
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / previous
        return cls(betas=betas, spec={"kind": "discrete", "betas": betas.tolist()})

    def log_alpha(self, t: np.ndarray) -> np.ndarray:
        return _interp_extrapolate(t, self.t_array, self.log_alpha_array)

    def inverse_lambda(self, lambda_t: np.ndarray) -> np.ndarray:
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lambda_t, dtype=np.float64))
        # log_alpha decreases with t, so flip both arrays to get an increasing abscissa.
        return _interp_extrapolate(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])

    def t_to_timestep(self, t: np.ndarray) -> np.ndarray:
        n = self.num_timesteps
        return (np.asarray(t, dtype=np.float64) - 1.0 / n) * n

    def timestep_to_t(self, timestep: np.ndarray) -> np.ndarray:
        n = self.num_timesteps
        return (np.asarray(timestep, dtype=np.float64) + 1.0) / n

    def alpha_sigma_at_timesteps(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (alpha, sigma) at every integer timestep 0..N-1, as used in training."""
        log_alpha = self.log_alpha_array
        return np.exp(log_alpha), np.sqrt(-np.expm1(2.0 * log_alpha))

    def to_spec(self) -> dict[str, Any]:
        if self.spec:
            return dict(self.spec)
        return {"kind": "discrete", "betas": self.betas.tolist()}


@dataclass
class LinearVPSchedule(VPSchedule):
    """Continuous VP schedule with beta(t) = beta_0 + t (beta_1 - beta_0), t in (0, 1].

    The network input time is ``timestep_scale * max(t - t_shift, 0)``; the published runs of
    calibrated DPM-Solver use ``1000 * max(t - 1/1000, 0)``.
    """

    beta_0: float = 0.1
    beta_1: float = 20.0
    timestep_scale: float = 1000.0
    t_shift: float = 1.0 / 1000.0
    kind: str = "linear"

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta_0 < self.beta_1):
            raise CalibexportError(
                f"need 0 <= beta_0 < beta_1, got beta_0={self.beta_0}, beta_1={self.beta_1}."
            )
        self.default_t_end = 1e-4

    def log_alpha(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lambda_t: np.ndarray) -> np.ndarray:
        # Solve log_alpha(t) = -0.5 logaddexp(0, -2 lambda) for t: a quadratic in t.
        lambda_t = np.asarray(lambda_t, dtype=np.float64)
        tmp = 2.0 * (self.beta_1 - self.beta_0) * np.logaddexp(0.0, -2.0 * lambda_t)
        delta = self.beta_0**2 + tmp
        return tmp / (np.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)

    def t_to_timestep(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return self.timestep_scale * np.maximum(t - self.t_shift, 0.0)

    def timestep_to_t(self, timestep: np.ndarray) -> np.ndarray:
        return np.asarray(timestep, dtype=np.float64) / self.timestep_scale + self.t_shift

    def to_spec(self) -> dict[str, Any]:
        return {
            "kind": "linear",
            "beta_0": self.beta_0,
            "beta_1": self.beta_1,
            "timestep_scale": self.timestep_scale,
            "t_shift": self.t_shift,
        }


def schedule_from_spec(spec: dict[str, Any]) -> VPSchedule:
    """Build a schedule from the dictionary that ``to_spec`` writes into artifacts."""
    kind = spec.get("kind")
    if kind == "discrete":
        if "betas" in spec:
            return DiscreteVPSchedule(
                betas=np.asarray(spec["betas"], dtype=np.float64), spec=dict(spec)
            )
        if spec.get("beta_schedule") == "linear":
            return DiscreteVPSchedule.linear(
                float(spec["beta_start"]), float(spec["beta_end"]), int(spec["num_timesteps"])
            )
        raise CalibexportError(
            f"discrete schedule spec needs 'betas' or beta_schedule='linear', got keys {sorted(spec)}."
        )
    if kind == "linear":
        return LinearVPSchedule(
            beta_0=float(spec.get("beta_0", 0.1)),
            beta_1=float(spec.get("beta_1", 20.0)),
            timestep_scale=float(spec.get("timestep_scale", 1000.0)),
            t_shift=float(spec.get("t_shift", 1.0 / 1000.0)),
        )
    raise CalibexportError(
        f"unknown schedule kind {kind!r}; valid kinds: {', '.join(SCHEDULE_KINDS)}."
    )
