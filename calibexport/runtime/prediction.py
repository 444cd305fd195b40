"""Prediction types of a diffusion network and the conversions between them.

A network evaluated at ``x_t = alpha_t x_0 + sigma_t eps`` predicts one of

* ``eps``: the noise ``eps``;
* ``x0``: the data ``x_0 = (x_t - sigma_t eps) / alpha_t``;
* ``v``: the velocity ``v = alpha_t eps - sigma_t x_0`` (Salimans and Ho, 2022), so that
  ``eps = alpha_t v + sigma_t x_t``.

Calibration works in eps units: the table contains ``eta_t = E[eps_theta(x_t, t)]``. A network of
another type is calibrated in its own units so that its implied eps becomes ``eps - eta_t``:

    eps: out - eta_t;   x0: out + (sigma_t / alpha_t) eta_t;   v: out - eta_t / alpha_t

The formulas use only ``+ - * /``, so they apply unchanged to numpy arrays and torch tensors;
``alpha`` and ``sigma`` must broadcast against the images (shape [B, 1, 1, 1]).
This module imports numpy only.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import DiscreteVPSchedule, VPSchedule

PREDICTION_TYPES = ("eps", "x0", "v")
#: The names diffusers schedulers use for the same prediction types.
DIFFUSERS_PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}

Array = TypeVar("Array")


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` if valid, else raise CalibexportError naming the choices."""
    if prediction_type not in PREDICTION_TYPES:
        raise CalibexportError(
            f"invalid prediction type {prediction_type!r}; valid types: "
            f"{', '.join(PREDICTION_TYPES)} (diffusers names: "
            f"{', '.join(DIFFUSERS_PREDICTION_TYPES)})."
        )
    return prediction_type


def alpha_sigma_at_timesteps(schedule: VPSchedule, timestep: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return float64 (alpha, sigma) at the network input times ``timestep``.

    Integer times of a discrete schedule take the schedule's own values at those steps; other
    times follow the schedule's interpolation of log_alpha in solver time.
    """
    timestep = np.asarray(timestep, dtype=np.float64)
    t = schedule.timestep_to_t(timestep)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    if isinstance(schedule, DiscreteVPSchedule):
        rows = np.rint(timestep)
        exact = (rows == timestep) & (rows >= 0) & (rows < schedule.num_timesteps)
        if np.any(exact):
            alpha_rows, sigma_rows = schedule.alpha_sigma_at_timesteps()
            index = np.where(exact, rows, 0).astype(np.int64)
            alpha = np.where(exact, alpha_rows[index], alpha)
            sigma = np.where(exact, sigma_rows[index], sigma)
    return alpha, sigma


def table_log_alpha(schedule: VPSchedule, num_rows: int) -> np.ndarray:
    """Return log_alpha at the table rows 0..num_rows-1 as float32, for the ONNX fold."""
    alpha, _ = alpha_sigma_at_timesteps(schedule, np.arange(num_rows, dtype=np.float64))
    return np.log(alpha).astype(np.float32)


def to_eps(prediction_type: str, output: Array, x: Any, alpha: Any, sigma: Any) -> Array:
    """Convert a network ``output`` of ``prediction_type`` at ``x`` to the implied eps."""
    if prediction_type == "eps":
        return output
    if prediction_type == "x0":
        return (x - alpha * output) / sigma
    if prediction_type == "v":
        return alpha * output + sigma * x
    check_prediction_type(prediction_type)
    raise AssertionError(f"unhandled prediction type {prediction_type!r}")


def from_eps(prediction_type: str, eps: Array, x: Any, alpha: Any, sigma: Any) -> Array:
    """Convert eps at ``x`` to the output a network of ``prediction_type`` would give."""
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return (x - sigma * eps) / alpha
    if prediction_type == "v":
        return (eps - sigma * x) / alpha
    check_prediction_type(prediction_type)
    raise AssertionError(f"unhandled prediction type {prediction_type!r}")


def calibrate_output(prediction_type: str, output: Array, eta: Any, alpha: Any,
                     sigma: Any) -> Array:
    """Apply the eps-unit offset ``eta`` to ``output`` in the network's own units.

    The result's implied eps is ``to_eps(output) - eta`` (see the module docstring).
    """
    if prediction_type == "eps":
        return output - eta
    if prediction_type == "x0":
        return output + (sigma / alpha) * eta
    if prediction_type == "v":
        return output - eta / alpha
    check_prediction_type(prediction_type)
    raise AssertionError(f"unhandled prediction type {prediction_type!r}")
