"""Small building blocks shared by the UNet: timestep embedding, norms, zero init, checkpointing."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

# GroupNorm groups of the original UNet: channel counts must be multiples of this.
NORM_GROUPS = 32
# On the CPU, a convolution with at most this many output positions (batch x height x width)
# and this many input channels runs as one matrix product (`Conv2d`).
GEMM_CONV_MAX_POSITIONS, GEMM_CONV_MIN_CHANNELS = 256, 256


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps, [cos | sin] (Vaswani et al. 2017, as in SD)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and weight dtypes, as the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's GroupNorm over `channels`."""
    if channels % NORM_GROUPS:
        raise ValueError(f"channel count {channels} is not a multiple of {NORM_GROUPS} norm groups")
    return GroupNorm32(NORM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` and return it (residual branches start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(fn: Callable, *args: torch.Tensor | None, enabled: bool) -> torch.Tensor:
    """Run `fn(*args)`, recomputing activations in backward when `enabled` and grads are on."""
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and keys) that runs small, wide CPU convolutions as a GEMM.

    At the UNet's lowest resolutions (e.g. 1280 channels on 8 x 8) oneDNN's direct convolution
    spends most of its time reordering the weight, and unfold + one matrix product is 2-3x
    faster, in backward too (bench/README.md). Elsewhere, on GPUs and under torch.compile this
    is nn.Conv2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_gemm(x):
            return super().forward(x)
        b = x.shape[0]
        out_h, out_w = (
            (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for size, pad, dil, k, stride in zip(
                x.shape[-2:],
                self.padding,
                self.dilation,
                self.kernel_size,
                self.stride,
                strict=True,
            )
        )
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C_in * k * k, B * H * W)
        weight = self.weight.view(self.out_channels, -1)  # (C_out, C_in * k * k)
        if self.bias is None:
            y = weight @ cols
        else:
            y = torch.addmm(self.bias[:, None], weight, cols)  # (C_out, B * H * W)
        return y.view(-1, b, out_h, out_w).transpose(0, 1).contiguous()  # (B, C_out, H, W)

    def use_gemm(self, x: torch.Tensor) -> bool:
        positions = x.shape[0] * x.shape[-2] * x.shape[-1] // (self.stride[0] * self.stride[1])
        return (
            x.device.type == "cpu"
            and x.ndim == 4
            and self.groups == 1
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and self.in_channels >= GEMM_CONV_MIN_CHANNELS
            and positions <= GEMM_CONV_MAX_POSITIONS
            and not torch.compiler.is_compiling()
        )
