"""x0- and v-prediction networks seen as noise predictors, and their calibration in eps units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibexport.calibration_tables.estimate import estimate_eta
from calibexport.errors import CalibexportError
from calibexport.models import DDPMUNet, UNetConfig
from calibexport.models.eps_adapter import EpsAdapter, as_eps_network
from calibexport.runtime.prediction import alpha_sigma_at_timesteps, calibrate_output, from_eps
from calibexport.runtime.schedule import DiscreteVPSchedule

SCHEDULE = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.2, num_timesteps=12)


class ReparameterizedNet(torch.nn.Module):
    """An eps network rewritten to predict ``prediction_type``, in float64 for exactness."""

    def __init__(self, eps_net: torch.nn.Module, prediction_type: str) -> None:
        super().__init__()
        self.eps_net = eps_net
        self.prediction_type = prediction_type

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        eps = self.eps_net(x, timestep).double()
        alpha, sigma = alpha_sigma_at_timesteps(SCHEDULE, torch.as_tensor(timestep).numpy())
        alpha = torch.from_numpy(alpha).reshape(-1, 1, 1, 1)
        sigma = torch.from_numpy(sigma).reshape(-1, 1, 1, 1)
        return from_eps(self.prediction_type, eps, x.double(), alpha, sigma).float()


@pytest.fixture(scope="module")
def eps_net() -> DDPMUNet:
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return DDPMUNet(config).eval()


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(batch, 1, 8, 8, generator=generator), torch.tensor([0.0, 4.5, 11.0])


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_adapter_recovers_eps(eps_net, prediction_type):
    x, timestep = inputs()
    adapter = EpsAdapter(ReparameterizedNet(eps_net, prediction_type), prediction_type, SCHEDULE)
    with torch.no_grad():
        expected = eps_net(x, timestep)
        got = adapter(x, timestep)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_adapter_accepts_python_number(eps_net):
    x, _ = inputs(2)
    adapter = EpsAdapter(ReparameterizedNet(eps_net, "v"), "v", SCHEDULE)
    with torch.no_grad():
        got = adapter(x, 7)
        expected = eps_net(x, torch.tensor([7.0, 7.0]))
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_as_eps_network_keeps_eps_networks(eps_net):
    assert as_eps_network(eps_net, "eps", SCHEDULE) is eps_net


def test_as_eps_network_rejects_unknown_type(eps_net):
    with pytest.raises(CalibexportError, match="invalid prediction type 'score'"):
        as_eps_network(eps_net, "score", SCHEDULE)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_x0_and_v_networks_calibrate_to_the_eps_table(eps_net, prediction_type):
    data = np.random.default_rng(0).uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32)
    options = dict(num_samples=4, batch_size=24, seed=3, progress=False)
    reference = estimate_eta(eps_net, SCHEDULE, data, **options)
    other = ReparameterizedNet(eps_net, prediction_type)
    estimate = estimate_eta(as_eps_network(other, prediction_type, SCHEDULE), SCHEDULE, data,
                            **options)
    np.testing.assert_allclose(estimate.eta, reference.eta, atol=2e-4)
    assert np.abs(reference.eta).max() > 1e-2


class CalibratedNet(torch.nn.Module):
    """``network`` corrected by ``eta`` in its own units, with calibrate_output on tensors."""

    def __init__(self, network: torch.nn.Module, prediction_type: str, eta: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        self.prediction_type = prediction_type
        self.eta = eta

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma_at_timesteps(SCHEDULE, timestep.numpy())
        alpha = torch.from_numpy(alpha).reshape(-1, 1, 1, 1)
        sigma = torch.from_numpy(sigma).reshape(-1, 1, 1, 1)
        output = self.network(x, timestep).double()
        rows = self.eta[timestep.long()].double()
        return calibrate_output(self.prediction_type, output, rows, alpha, sigma).float()


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_torch_calibrated_network_implies_eps_minus_eta(eps_net, prediction_type):
    eta = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.1
    network = ReparameterizedNet(eps_net, prediction_type)
    calibrated = EpsAdapter(CalibratedNet(network, prediction_type, eta), prediction_type, SCHEDULE)
    x, _ = inputs()
    timestep = torch.tensor([0.0, 5.0, 11.0])
    with torch.no_grad():
        expected = eps_net(x, timestep) - eta[timestep.long()]
        got = calibrated(x, timestep)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
