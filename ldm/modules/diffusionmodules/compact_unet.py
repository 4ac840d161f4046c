"""A compact pixel-space U-Net in the style of denoising-diffusion-pytorch (Wang's `Unet`).

Sinusoidal time embedding through Linear-GELU-Linear; ResNet blocks with RMSNorm whose output
the time embedding scales and shifts; linear attention with learned memory key/values at the
high resolutions and full (SDPA) attention at the lowest; pixel-unshuffle downsampling,
nearest-upsample + conv upsampling; a last ResNet block over the features concatenated with
the first convolution's (the input skip). Unconditional: `forward(x, timesteps)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class RMSNorm(nn.Module):
    """x / rms over channels, times a learned per-channel gain."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.gain * x.shape[1] ** 0.5


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim): sin and cos of t at geometric frequencies (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ResnetBlock(nn.Module):
    """Two conv-RMSNorm-SiLU blocks; the time embedding scales and shifts the first."""

    def __init__(self, dim: int, dim_out: int, time_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.conv1, self.norm1 = nn.Conv2d(dim, dim_out, 3, padding=1), RMSNorm(dim_out)
        self.conv2, self.norm2 = nn.Conv2d(dim_out, dim_out, 3, padding=1), RMSNorm(dim_out)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time_mlp(emb)[..., None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = F.silu(self.norm1(self.conv1(x)) * (scale + 1) + shift)
        h = F.silu(self.norm2(self.conv2(self.dropout(h))))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over pixels with `num_mem_kv` learned extra keys/values.

    `linear`: the softmax over keys and queries taken separately (Shen et al. 2021), O(HW).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, linear: bool, num_mem_kv: int = 4):
        super().__init__()
        self.heads, self.linear, self.scale = heads, linear, dim_head**-0.5
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        out = nn.Conv2d(heads * dim_head, dim, 1)
        self.to_out = nn.Sequential(out, RMSNorm(dim)) if linear else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        qkv = self.to_qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (rearrange(a, "b (h d) x y -> b h (x y) d", h=self.heads) for a in qkv)
        mem_k, mem_v = (m.expand(x.shape[0], -1, -1, -1) for m in self.mem_kv)
        k, v = torch.cat([mem_k, k], dim=2), torch.cat([mem_v, v], dim=2)  # (B, h, M + N, d)
        if self.linear:
            q, k = q.softmax(dim=-1) * self.scale, k.softmax(dim=-2)
            out = q @ (k.transpose(-1, -2) @ v)  # (B, h, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h (x y) d -> b (h d) x y", x=height)) + x


def downsample(dim: int, dim_out: int) -> nn.Module:
    """Pixel-unshuffle (each 2 × 2 patch to channels), then a 1 × 1 conv."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, dim_out, 1))


def upsample(dim: int, dim_out: int) -> nn.Module:
    """Nearest-neighbour 2× upsampling, then a 3 × 3 conv."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1)
    )


class CompactUNet(nn.Module):
    """Images (B, in_channels, H, W) and timesteps (B,) to (B, out_channels, H, W).

    H and W must be divisible by 2 ** (len(dim_mults) - 1).
    """

    def __init__(
        self,
        dim: int = 64,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        in_channels: int = 3,
        out_channels: int | None = None,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.levels = len(dim_mults)
        time_dim = dim * 4
        self.time_dim = dim
        self.time_mlp = nn.Sequential(
            nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        self.init_conv = nn.Conv2d(in_channels, dim, 7, padding=3)
        dims = [dim, *(dim * m for m in dim_mults)]
        pairs = list(zip(dims[:-1], dims[1:], strict=True))

        def block(a: int, b: int) -> ResnetBlock:
            return ResnetBlock(a, b, time_dim, dropout)

        def attention(d: int, lowest: bool) -> Attention:
            return Attention(d, attn_heads, attn_dim_head, linear=not lowest)

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            resample = downsample(d_in, d_out) if not last else nn.Conv2d(d_in, d_out, 3, padding=1)
            self.downs.append(
                nn.ModuleList(
                    [block(d_in, d_in), block(d_in, d_in), attention(d_in, last), resample]
                )
            )
        mid = dims[-1]
        self.mid = nn.ModuleList([block(mid, mid), attention(mid, True), block(mid, mid)])
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(pairs)):
            first = i == 0
            resample = (
                upsample(d_out, d_in)
                if i < len(pairs) - 1
                else nn.Conv2d(d_out, d_in, 3, padding=1)
            )
            self.ups.append(
                nn.ModuleList(
                    [
                        block(d_out + d_in, d_out),
                        block(d_out + d_in, d_out),
                        attention(d_out, first),
                        resample,
                    ]
                )
            )
        self.final_block = block(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, out_channels or in_channels, 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        if context is not None:
            raise ValueError("CompactUNet is unconditional: use a conditioning_key of null")
        factor = 2 ** (self.levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"CompactUNet: H and W {tuple(x.shape[-2:])} must be multiples of {factor}"
            )
        emb = self.time_mlp(sinusoidal_embedding(timesteps, self.time_dim))  # (B, 4 dim)
        x = self.init_conv(x)
        first, skips = x, []
        for block1, block2, attn, resample in self.downs:
            x = block1(x, emb)
            skips.append(x)
            x = attn(block2(x, emb))
            skips.append(x)
            x = resample(x)
        block1, attn, block2 = self.mid
        x = block2(attn(block1(x, emb)), emb)
        for block1, block2, attn, resample in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), emb)
            x = attn(block2(torch.cat([x, skips.pop()], dim=1), emb))
            x = resample(x)
        return self.final_conv(self.final_block(torch.cat([x, first], dim=1), emb))
