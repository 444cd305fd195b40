"""DDPMUNet: timestep handling, the sinusoidal embedding, key layout and config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calibexport.errors import CalibexportError
from calibexport.models import DDPMUNet, UNetConfig
from calibexport.models.unet import timestep_embedding


@pytest.fixture
def tiny_net(tiny_spec, make_state, reference_net) -> DDPMUNet:
    return reference_net(make_state(0))


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def evaluate(module: torch.nn.Module, x: torch.Tensor, timestep) -> torch.Tensor:
    with torch.no_grad():
        return module(x, timestep)


# Timestep input ---------------------------------------------------------------------------------


TIMESTEP_FORMS = {
    "python_int": 937,
    "python_float": 937.0,
    "tensor_0d_int64": torch.tensor(937),
    "tensor_0d_float32": torch.tensor(937.0),
    "batch_int32": torch.tensor([937, 937], dtype=torch.int32),
    "batch_int64": torch.tensor([937, 937], dtype=torch.int64),
    "batch_float32": torch.tensor([937, 937], dtype=torch.float32),
    "batch_float64": torch.tensor([937, 937], dtype=torch.float64),
}


@pytest.mark.parametrize("form", sorted(TIMESTEP_FORMS))
def test_timestep_forms_give_same_output(tiny_net, batch, form):
    expected = evaluate(tiny_net, batch, torch.tensor([937, 937], dtype=torch.int64))

    output = evaluate(tiny_net, batch, TIMESTEP_FORMS[form])

    assert torch.equal(output, expected)


def test_timestep_changes_output(tiny_net, batch):
    early = evaluate(tiny_net, batch, 0)
    late = evaluate(tiny_net, batch, 999)

    assert not torch.allclose(early, late)


def test_per_sample_timesteps(tiny_net, batch):
    together = evaluate(tiny_net, batch, torch.tensor([10, 500]))

    first = evaluate(tiny_net, batch[:1], 10)
    second = evaluate(tiny_net, batch[1:], 500)

    assert torch.allclose(together[:1], first, rtol=0, atol=1e-5)
    assert torch.allclose(together[1:], second, rtol=0, atol=1e-5)


def test_output_shape_matches_input(tiny_net, batch):
    assert evaluate(tiny_net, batch, 3).shape == batch.shape


# Timestep embedding -----------------------------------------------------------------------------


def test_embedding_matches_formula():
    timesteps = np.array([0.0, 1.0, 37.5, 937.0, 999.0])
    dim = 32
    half = dim // 2
    freqs = np.exp(-np.arange(half) * math.log(10000.0) / (half - 1))
    angles = timesteps[:, None] * freqs[None, :]
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    embedding = timestep_embedding(torch.tensor(timesteps), dim)

    assert embedding.dtype == torch.float32
    np.testing.assert_allclose(embedding.numpy(), expected, rtol=0, atol=1e-4)


def test_embedding_flip_swaps_halves():
    timesteps = torch.tensor([3.0, 937.0])

    plain = timestep_embedding(timesteps, 32)
    flipped = timestep_embedding(timesteps, 32, flip_sin_to_cos=True)

    assert torch.equal(flipped[:, :16], plain[:, 16:])
    assert torch.equal(flipped[:, 16:], plain[:, :16])


def test_embedding_float32_for_half_input():
    # 937 is exact in float16, and the embedding itself is computed in float32.
    half_input = timestep_embedding(torch.tensor([937.0], dtype=torch.float16), 32)
    full_input = timestep_embedding(torch.tensor([937.0], dtype=torch.float32), 32)

    assert half_input.dtype == torch.float32
    assert torch.equal(half_input, full_input)


def test_flip_sin_to_cos_changes_output(tiny_spec, make_state, batch):
    state = make_state(0)
    flipped_config = UNetConfig.from_dict({**tiny_spec.unet.to_dict(), "flip_sin_to_cos": True})
    plain = DDPMUNet(tiny_spec.unet).eval()
    flipped = DDPMUNet(flipped_config).eval()
    plain.load_state_dict(state)
    flipped.load_state_dict(state)

    assert not torch.allclose(evaluate(plain, batch, 100), evaluate(flipped, batch, 100))


# State_dict layout ------------------------------------------------------------------------------


def test_key_layout_matches_ddpm(tiny_spec):
    keys = set(DDPMUNet(tiny_spec.unet).state_dict())

    expected = [
        "temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight",
        "down.0.block.0.norm1.weight", "down.0.block.0.conv1.weight",
        "down.0.block.0.temb_proj.weight", "down.0.block.0.norm2.bias",
        "down.0.block.0.conv2.weight", "down.0.downsample.conv.weight",
        "down.1.block.0.nin_shortcut.weight", "down.1.attn.0.norm.weight",
        "down.1.attn.0.q.weight", "down.1.attn.0.k.weight", "down.1.attn.0.v.weight",
        "down.1.attn.0.proj_out.weight", "mid.block_1.conv1.weight", "mid.attn_1.q.weight",
        "mid.block_2.conv2.bias", "up.0.block.1.nin_shortcut.weight", "up.1.attn.1.q.weight",
        "up.1.upsample.conv.weight", "norm_out.weight", "conv_out.bias",
    ]
    for key in expected:
        assert key in keys, key


def test_up_path_has_extra_block(tiny_spec):
    net = DDPMUNet(tiny_spec.unet)

    assert len(net.down[0].block) == tiny_spec.unet.num_res_blocks
    assert len(net.up[0].block) == tiny_spec.unet.num_res_blocks + 1
    assert not hasattr(net.down[1], "downsample")
    assert not hasattr(net.up[0], "upsample")


def test_no_buffers(tiny_spec):
    net = DDPMUNet(tiny_spec.unet)

    assert len(list(net.buffers())) == 0


# UNetConfig -------------------------------------------------------------------------------------


def test_config_round_trip(tiny_spec):
    data = tiny_spec.unet.to_dict()

    assert UNetConfig.from_dict(data) == tiny_spec.unet
    assert data["ch_mult"] == [1, 2]


def test_config_rejects_unknown_key(tiny_spec):
    with pytest.raises(CalibexportError, match=r"unknown UNet config keys \['channels'\]"):
        UNetConfig.from_dict({**tiny_spec.unet.to_dict(), "channels": 3})


def test_config_rejects_ch_not_multiple_of_32():
    with pytest.raises(CalibexportError, match="multiple of 32.*got 48"):
        UNetConfig(ch=48)


def test_config_rejects_indivisible_resolution():
    with pytest.raises(CalibexportError, match="resolution 12 is not divisible by 2\\^3"):
        UNetConfig(resolution=12, ch_mult=(1, 2, 2, 2))
