"""Tiny random-weight UNets shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from calibexport.models import DDPMUNet, ModelSpec, UNetConfig


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_spec() -> ModelSpec:
    """A one-channel 8x8 UNet with two resolution levels and attention at 4x4."""
    unet = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                      num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return ModelSpec(unet=unet)


@pytest.fixture
def make_state(tiny_spec: ModelSpec) -> Callable[[int], dict[str, torch.Tensor]]:
    """Return a factory of random state_dicts for ``tiny_spec``; each seed gives other weights.

    Every tensor, GroupNorm scales and biases included, is perturbed, so a tensor that the
    loader puts in the wrong place changes the output.
    """

    def make(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        module = DDPMUNet(tiny_spec.unet)
        state = {}
        for key, tensor in module.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator) * 0.05
            state[key] = (tensor + noise).detach().clone()
        return state

    return make


@pytest.fixture
def run_net(tiny_spec: ModelSpec) -> Callable[[torch.nn.Module], torch.Tensor]:
    """Return a function that evaluates a module on a fixed batch of 2 inputs at t = (3, 700)."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 1, 8, 8, generator=generator)
    timestep = torch.tensor([3, 700])

    def run(module: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return module(x, timestep)

    return run


@pytest.fixture
def reference_net(tiny_spec: ModelSpec) -> Callable[[dict[str, torch.Tensor]], DDPMUNet]:
    """Return a factory that builds the tiny UNet directly from a state_dict, in eval mode."""

    def build(state: dict[str, torch.Tensor]) -> DDPMUNet:
        module = DDPMUNet(tiny_spec.unet)
        module.load_state_dict(state, strict=True)
        return module.eval()

    return build
