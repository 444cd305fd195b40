"""The peer for the sampling benchmark: the same network in diffusers' DPM-Solver scheduler loop.

The loop is the usual diffusers one, all in PyTorch: ``set_timesteps``, then for each timestep
one network call, the calibration subtraction ``eta[t]`` (diffusers' timesteps are integers, so
the table row is exact) and ``scheduler.step``. ``singlestep`` uses
``DPMSolverSinglestepScheduler`` and ``multistep`` uses ``DPMSolverMultistepScheduler``, both
with their default algorithm type ``dpmsolver++`` and the model's discrete beta schedule.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np


def make_scheduler(method: str, order: int, schedule_spec: dict[str, Any]) -> Any:
    """Return the diffusers DPM-Solver scheduler for ``method`` on the model's schedule."""
    from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

    if schedule_spec.get("kind") != "discrete" or schedule_spec.get("beta_schedule") != "linear":
        raise SystemExit(f"the diffusers peer needs a discrete linear schedule: {schedule_spec}")
    cls = {"singlestep": DPMSolverSinglestepScheduler,
           "multistep": DPMSolverMultistepScheduler}.get(method)
    if cls is None:
        raise SystemExit(f"the diffusers peer has no scheduler for method {method!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return cls(num_train_timesteps=int(schedule_spec["num_timesteps"]),
                   beta_start=float(schedule_spec["beta_start"]),
                   beta_end=float(schedule_spec["beta_end"]), beta_schedule="linear",
                   solver_order=order, prediction_type="epsilon", lower_order_final=True)


class DiffusersLoop:
    """Sample with a diffusers scheduler around ``network(x, t) - eta[t]`` in PyTorch.

    ``network`` None replaces the network by a preallocated zero tensor, which measures the
    scheduler loop alone. ``nfe`` counts the network calls of the last run.
    """

    def __init__(self, scheduler: Any, network: Any, eta: np.ndarray | None, steps: int) -> None:
        import torch

        self.scheduler = scheduler
        self.network = network
        self.eta = None if eta is None else torch.from_numpy(np.asarray(eta, dtype=np.float32))
        self.steps = steps
        self.nfe = 0
        self._zeros: dict[tuple[int, ...], Any] = {}

    def _eps(self, x: Any, t: Any) -> Any:
        import torch

        if self.network is None:
            if x.shape not in self._zeros:
                self._zeros[x.shape] = torch.zeros(x.shape)
            return self._zeros[x.shape]
        eps = self.network(x, t.expand(x.shape[0]).to(torch.float32))
        if self.eta is not None:
            eps = eps - self.eta[int(t)]
        return eps

    def run(self, x_T: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            self.scheduler.set_timesteps(self.steps)
            x = torch.from_numpy(x_T) * self.scheduler.init_noise_sigma
            self.nfe = 0
            for t in self.scheduler.timesteps:
                eps = self._eps(x, t)
                self.nfe += 1
                x = self.scheduler.step(eps, t, x).prev_sample
            return x.numpy()
