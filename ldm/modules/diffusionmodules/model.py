"""Encoder and Decoder networks of the KL autoencoder, with the original module names.

Esser et al. 2021 (VQGAN architecture); Rombach et al. 2022 (the SD first stage).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.util import ConfigError, reject_unsupported

# GroupNorm of the autoencoder (`Normalize` in the original).
NORM_GROUPS, NORM_EPS = 32, 1e-6
# Attention types we build; "vanilla-xformers" is the same math (and keys), done here by SDPA.
ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")
# Attention types the original has that we do not build (other modules, other checkpoint keys).
UNBUILT_ATTN_TYPES = ("linear", "memory-efficient-cross-attn")
# One `ddconfig` builds both networks, so each takes the other's params too.
COMPAT_PARAMS = {
    "out_ch": "Decoder only (the Encoder's output width is set by z_channels)",
    "double_z": "Encoder only (the Decoder reads z_channels)",
    "in_channels": "Encoder only (the Decoder reads z_channels)",
    "give_pre_end": "Decoder only",
    "tanh_out": "Decoder only",
}


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802  (the original's name)
    """GroupNorm(32, channels, eps=1e-6) with affine weights."""
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU."""
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric (right/bottom) padding, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetBlock(nn.Module):
    """Two norm-swish-conv layers with a residual connection (1x1 conv when widths differ).

    `temb_channels > 0` adds the projected time embedding after the first conv, as the original
    does for its diffusion variant; the autoencoder uses 0 (no `temb_proj` weights).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        temb_channels: int = 0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + rearrange(self.temb_proj(nonlinearity(temb)), "b c -> b c 1 1")
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, with 1x1-conv q, k, v and output projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        height, width = x.shape[-2:]
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(out)


def make_attn(channels: int, attn_type: str) -> nn.Module:
    """The attention block named by `attn_type` (see ATTN_TYPES)."""
    return nn.Identity() if attn_type == "none" else AttnBlock(channels)


def check_attn(use_linear_attn: bool, attn_type: str) -> None:
    """Reject the attention options this implementation does not have, naming the key."""
    if attn_type not in (*ATTN_TYPES, *UNBUILT_ATTN_TYPES):
        raise ConfigError(f"ddconfig.attn_type {attn_type!r} is unknown; use one of {ATTN_TYPES}")
    reject_unsupported(
        "ddconfig",
        {
            "use_linear_attn": (use_linear_attn, False),
            "attn_type": (attn_type, frozenset(ATTN_TYPES)),
        },
    )


def make_mid(channels: int, dropout: float, attn_type: str) -> nn.Module:
    """ResnetBlock, attention, ResnetBlock at the lowest resolution."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = make_attn(channels, attn_type)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The middle of either network; keeps the shape."""
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def make_level(blocks: list[ResnetBlock], attn: list[nn.Module]) -> nn.Module:
    """One resolution level: `block.{j}` and `attn.{j}` (empty without attention there)."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    return level


def run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Each ResnetBlock, followed by its attention block when the level has attention."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) to latent moments (B, 2 z_channels, H/f, W/f), f = 2^(L-1)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
    ):
        super().__init__()
        check_attn(use_linear_attn, attn_type)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            level = make_level(blocks, attn)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(level)
        self.mid = make_mid(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, 3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) to images (B, out_ch, h·f, w·f)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
    ):
        super().__init__()
        check_attn(use_linear_attn, attn_type)
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = make_mid(block_in, dropout, attn_type)
        levels = []
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            level = make_level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
