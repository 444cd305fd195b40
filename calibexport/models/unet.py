"""The DDPM/DDIM noise-prediction UNet with the original state_dict key layout.

Parameter names match the public DDPM (Ho et al., 2020, converted to PyTorch) and DDIM
(Song et al., 2021) checkpoints, so their state_dicts load without renaming: ``temb.dense``,
``conv_in``, ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``, ``mid.block_1``, ``mid.attn_1``,
``mid.block_2``, ``up.{i}.block.{j}``, ``up.{i}.attn.{j}``, ``norm_out`` and ``conv_out``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calibexport.errors import CalibexportError


@dataclass
class UNetConfig:
    """Architecture of the DDPM/DDIM UNet, in the field names of the DDIM YAML configs."""

    resolution: int = 32
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    # Scaled-sine order of the timestep embedding: False gives [sin, cos] as in DDPM/DDIM.
    flip_sin_to_cos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.ch % 2 or self.ch < 4:
            raise CalibexportError(f"ch must be an even number >= 4, got {self.ch}.")
        if self.ch % 32:
            raise CalibexportError(f"ch must be a multiple of 32 for GroupNorm(32), got {self.ch}.")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise CalibexportError(
                f"resolution {self.resolution} is not divisible by 2^{len(self.ch_mult) - 1}, "
                f"which ch_mult={list(self.ch_mult)} needs."
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ch_mult"] = list(self.ch_mult)
        data["attn_resolutions"] = list(self.attn_resolutions)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(set(data) - known - {"extra"})
        if unknown:
            raise CalibexportError(
                f"unknown UNet config keys {unknown}; valid keys: {sorted(known)}."
            )
        return cls(**{k: v for k, v in data.items() if k in known or k == "extra"})


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False
) -> torch.Tensor:
    """Sinusoidal embedding of [B] timesteps: freq_i = exp(-i ln(10000) / (dim/2 - 1)).

    Computed in float32 whatever the model's dtype, so that t = 937 stays exact in fp16 builds.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent * (-math.log(10000.0) / (half - 1)))
    angles = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    parts = (
        [torch.cos(angles), torch.sin(angles)]
        if flip_sin_to_cos
        else [torch.sin(angles), torch.cos(angles)]
    )
    return torch.cat(parts, dim=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            # Asymmetric padding (right and bottom only) as in the original TensorFlow model.
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(
                in_channels, out_channels, kernel_size=1, stride=1, padding=0
            )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions with 1x1 convolutions, scale C^-1/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, height, width = q.shape

        # weights[b, i, j] = softmax_j(q_i . k_j / sqrt(C)), i and j over the H*W positions.
        q = q.reshape(b, c, height * width).permute(0, 2, 1)
        k = k.reshape(b, c, height * width)
        weights = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)

        # out[b, c, i] = sum_j v[b, c, j] weights[b, i, j]
        v = v.reshape(b, c, height * width)
        h = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)
        return x + self.proj_out(h)


class DDPMUNet(nn.Module):
    """Noise-prediction UNet eps_theta(x, timestep) of DDPM/DDIM.

    ``forward`` accepts the timestep as a Python number, a 0-d tensor or a ``[B]`` tensor of
    any numeric dtype; a scalar is broadcast over the batch.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, ch_mult = config.ch, config.ch_mult
        self.temb_ch = ch * 4
        self.num_resolutions = len(ch_mult)

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList(
            [nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)]
        )
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, stride=1, padding=1)

        # Downsampling path: record the channel count of every skip connection.
        current_res = config.resolution
        in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            block_in = ch * in_ch_mult[level]
            block_out = ch * ch_mult[level]
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, self.temb_ch, config.dropout))
                block_in = block_out
                if current_res in config.attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, config.resamp_with_conv)
                current_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, config.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, config.dropout)

        # Upsampling path: num_res_blocks + 1 blocks per level, each taking one skip connection.
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            block_out = ch * ch_mult[level]
            skip_in = ch * ch_mult[level]
            for i_block in range(config.num_res_blocks + 1):
                if i_block == config.num_res_blocks:
                    skip_in = ch * in_ch_mult[level]
                up.block.append(
                    ResnetBlock(block_in + skip_in, block_out, self.temb_ch, config.dropout)
                )
                block_in = block_out
                if current_res in config.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in, config.resamp_with_conv)
                current_res *= 2
            self.up.insert(0, up)

        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.dim() == 0:
            timestep = timestep.reshape(1).expand(x.shape[0])

        temb = timestep_embedding(timestep, self.config.ch, self.config.flip_sin_to_cos).to(x.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for level in range(self.num_resolutions):
            for i_block in range(self.config.num_res_blocks):
                h = self.down[level].block[i_block](hs[-1], temb)
                if len(self.down[level].attn) > 0:
                    h = self.down[level].attn[i_block](h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                hs.append(self.down[level].downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for level in reversed(range(self.num_resolutions)):
            for i_block in range(self.config.num_res_blocks + 1):
                h = self.up[level].block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(self.up[level].attn) > 0:
                    h = self.up[level].attn[i_block](h)
            if level != 0:
                h = self.up[level].upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
