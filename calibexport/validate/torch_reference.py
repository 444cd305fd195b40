"""The PyTorch calibrated model as an eps backend: net(x, t) - eta(t), computed outside ONNX."""

from __future__ import annotations

import numpy as np
import torch

from calibexport.runtime.backends.base import EpsBackend
from calibexport.runtime.eta_table import EtaTable


class TorchCalibratedBackend(EpsBackend):
    """Evaluate ``module(x, t) - eta(t)`` in eager PyTorch, float32 on the CPU.

    eta(t) comes from ``EtaTable.at``, the numpy reference for the rule the ONNX fold implements
    (clamp, floor, gather two rows, interpolate linearly), so this backend checks the fold too.
    """

    name = "pytorch"

    def __init__(self, module: torch.nn.Module, eta: EtaTable | None, image_shape: tuple[int, int, int],
                 timestep_dtype: np.dtype = np.dtype(np.float32)) -> None:
        self.module = module.eval()
        self.eta = eta
        self.image_shape = tuple(image_shape)
        self.timestep_dtype = np.dtype(timestep_dtype)

    @torch.inference_mode()
    def _eps(self, x: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        eps = self.module(torch.from_numpy(x), torch.from_numpy(timestep)).numpy()
        if self.eta is None:
            return eps
        return eps - self.eta.at(timestep.astype(np.float64))
