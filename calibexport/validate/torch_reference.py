"""The PyTorch calibrated model as an eps backend: net(x, t) - eta(t), computed outside ONNX."""

from __future__ import annotations

import numpy as np
import torch

from calibexport.errors import CalibexportError
from calibexport.runtime.backends.base import EpsBackend
from calibexport.runtime.eta_table import EtaTable
from calibexport.runtime.prediction import (
    alpha_sigma_at_timesteps,
    calibrate_output,
    check_prediction_type,
)
from calibexport.runtime.schedule import VPSchedule


class TorchCalibratedBackend(EpsBackend):
    """Evaluate ``module(x, t) - eta(t)`` in eager PyTorch, float32 on the CPU.

    For an x0 or v network the correction is applied in its own units, as the ONNX fold does
    (``calibexport.runtime.prediction.calibrate_output``).

    eta(t) comes from ``EtaTable.at``, the numpy reference for the rule the ONNX fold implements
    (clamp, floor, gather two rows, interpolate linearly), so this backend checks the fold too.
    """

    name = "pytorch"

    def __init__(self, module: torch.nn.Module, eta: EtaTable | None, image_shape: tuple[int, int, int],
                 timestep_dtype: np.dtype = np.dtype(np.float32), *, prediction_type: str = "eps",
                 schedule: VPSchedule | None = None) -> None:
        self.module = module.eval()
        self.eta = eta
        self.image_shape = tuple(image_shape)
        self.timestep_dtype = np.dtype(timestep_dtype)
        self.prediction_type = check_prediction_type(prediction_type)
        if prediction_type != "eps" and eta is not None and schedule is None:
            raise CalibexportError(
                f"calibrating a {prediction_type} network needs its schedule; pass schedule=."
            )
        self.schedule = schedule

    @torch.inference_mode()
    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        output = self.module(torch.from_numpy(x), torch.from_numpy(timestep)).numpy()
        if self.eta is None:
            return output
        eta = self.eta.at(timestep.astype(np.float64))
        if self.prediction_type == "eps":
            return output - eta
        # x0/v: the fold's correction, with alpha and sigma at the clamped table time.
        clamped = np.clip(timestep.astype(np.float64), 0, self.eta.num_timesteps - 1)
        alpha, sigma = alpha_sigma_at_timesteps(self.schedule, clamped)
        shape = (-1, 1, 1, 1)
        calibrated = calibrate_output(self.prediction_type, output.astype(np.float64), eta,
                                      alpha.reshape(shape), sigma.reshape(shape))
        return calibrated.astype(np.float32)
