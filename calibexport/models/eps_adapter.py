"""A torch module that turns an x0- or v-prediction network into a noise-prediction network.

Calibration estimates ``eta_t = E[eps_theta(x_t, t)]`` in eps units whatever the network
predicts, so ``estimate_eta`` evaluates networks of other types through ``EpsAdapter``.
"""

from __future__ import annotations

import torch

from calibexport.runtime.prediction import alpha_sigma_at_timesteps, check_prediction_type, to_eps
from calibexport.runtime.schedule import VPSchedule


class EpsAdapter(torch.nn.Module):
    """Return the eps implied by ``network(x, timestep)`` of type ``prediction_type``.

    alpha and sigma at each sample's model input time come from
    ``calibexport.runtime.prediction.alpha_sigma_at_timesteps``, the schedule's own values at
    integer steps and its log_alpha interpolation between them. The conversion runs in float64
    and returns the network's dtype. The adapter is for evaluation in eager torch, not for ONNX
    export, because the schedule lookup runs in numpy.
    """

    def __init__(self, network: torch.nn.Module, prediction_type: str,
                 schedule: VPSchedule) -> None:
        super().__init__()
        self.network = network
        self.prediction_type = check_prediction_type(prediction_type)
        self.schedule = schedule

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        output = self.network(x, timestep)
        if self.prediction_type == "eps":
            return output
        timestep = torch.as_tensor(timestep).detach().to("cpu", torch.float64).reshape(-1)
        alpha, sigma = alpha_sigma_at_timesteps(self.schedule, timestep.numpy())
        shape = (-1, 1, 1, 1)
        alpha_t = torch.from_numpy(alpha).to(output.device).reshape(shape)
        sigma_t = torch.from_numpy(sigma).to(output.device).reshape(shape)
        eps = to_eps(self.prediction_type, output.double(), x.double(), alpha_t, sigma_t)
        return eps.to(output.dtype)


def as_eps_network(network: torch.nn.Module, prediction_type: str,
                   schedule: VPSchedule) -> torch.nn.Module:
    """Return ``network`` itself for eps networks, else an ``EpsAdapter`` around it."""
    if check_prediction_type(prediction_type) == "eps":
        return network
    return EpsAdapter(network, prediction_type, schedule)
