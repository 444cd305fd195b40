"""Time grids for the samplers: where the solver places its steps on (0, t_max].

Three spacings, as in the reference DPM-Solver code (Lu et al., NeurIPS 2022):

* ``logSNR``: equal steps in lambda_t (half log-SNR), mapped back with ``inverse_lambda``;
* ``time_uniform``: equal steps in t;
* ``time_quadratic``: equal steps in sqrt(t), then squared (denser near t_end).

Every grid is float64, starts exactly at ``t_start``, ends exactly at ``t_end`` and has strictly
increasing lambda values, so no solver step has a zero step size h.
"""

from __future__ import annotations

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import VPSchedule

SPACINGS = ("logSNR", "time_uniform", "time_quadratic")


def check_spacing(spacing: str) -> None:
    """Raise CalibexportError unless ``spacing`` is one of SPACINGS."""
    if spacing not in SPACINGS:
        raise CalibexportError(
            f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}."
        )


def time_grid(
    schedule: VPSchedule, spacing: str, num_intervals: int, t_start: float, t_end: float
) -> np.ndarray:
    """Return ``num_intervals + 1`` solver times from ``t_start`` down to ``t_end`` (float64).

    Raises CalibexportError for an unknown spacing, ``num_intervals < 1``, ``t_end >= t_start``
    or a grid whose consecutive times do not have strictly increasing lambda (two times that
    coincide in float64, or a schedule that is not monotone there).
    """
    check_spacing(spacing)
    is_int = isinstance(num_intervals, (int, np.integer)) and not isinstance(num_intervals, bool)
    if not is_int or num_intervals < 1:
        raise CalibexportError(
            f"num_intervals={num_intervals!r} is invalid; the grid needs an integer number of "
            f"intervals, at least 1."
        )
    t_start, t_end = float(t_start), float(t_end)
    if not t_end < t_start:
        raise CalibexportError(
            f"t_end={t_end} must be smaller than t_start={t_start}; the solver runs from high "
            f"noise (t_start) to low noise (t_end)."
        )
    num_intervals = int(num_intervals)

    if spacing == "logSNR":
        lambda_start, lambda_end = schedule.lambda_(np.array([t_start, t_end]))
        lambdas = np.linspace(lambda_start, lambda_end, num_intervals + 1)
        times = schedule.inverse_lambda(lambdas)
    elif spacing == "time_uniform":
        times = np.linspace(t_start, t_end, num_intervals + 1)
    else:
        times = np.linspace(np.sqrt(t_start), np.sqrt(t_end), num_intervals + 1) ** 2
    times = np.asarray(times, dtype=np.float64)
    # inverse_lambda(lambda(t)) and the square of sqrt(t) round; pin the ends to the request.
    times[0], times[-1] = t_start, t_end

    check_increasing_lambda(schedule, times)
    return times


def check_increasing_lambda(schedule: VPSchedule, times: np.ndarray) -> None:
    """Raise CalibexportError unless lambda(times) is finite and strictly increasing."""
    lambdas = schedule.lambda_(times)
    bad = ~(np.diff(lambdas) > 0.0)
    if np.any(bad):
        i = int(np.argmax(bad))
        t_a, t_b = float(times[i]), float(times[i + 1])
        lambda_a, lambda_b = float(lambdas[i]), float(lambdas[i + 1])
        raise CalibexportError(
            f"the time grid collapses: t={t_a!r} and t={t_b!r} give lambda {lambda_a!r} and "
            f"{lambda_b!r}, which are not strictly increasing, so a "
            f"solver step would have h = 0; use fewer steps or a wider [t_end, t_start]."
        )
