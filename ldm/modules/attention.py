"""Cross-attention transformer blocks of the SD UNet, on PyTorch's scaled_dot_product_attention.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import Conv2d, maybe_checkpoint, zero_module

# GroupNorm of the transformer input, as the original `Normalize`.
NORM_GROUPS, NORM_EPS = 32, 1e-6


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-d tensor, else the default (NCHW) format."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


class GEGLU(nn.Module):
    """Linear projection with a GELU gate (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, dim_out) each
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward; `net.0.proj` and `net.2` are the checkpoint's names."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when context is None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            rearrange(proj(src), "b n (h d) -> b h n d", h=self.heads)  # (B, heads, N, d)
            for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-norm and residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        checkpoint: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        attn1_context = context_dim if disable_self_attn else None
        self.attn1 = CrossAttention(dim, attn1_context, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, context, enabled=self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context` (B, L, context_dim).

    `use_linear` projects in and out with Linear layers after flattening (SD 2.x) instead of
    1x1 convolutions before it (SD 1.x); the checkpoint layouts differ accordingly.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(NORM_GROUPS, in_channels, eps=NORM_EPS)
        proj = nn.Linear if use_linear else lambda i, o: Conv2d(i, o, kernel_size=1)
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, n_heads, d_head, dropout, context_dim, disable_self_attn, use_checkpoint
            )
            for _ in range(depth)
        )
        self.proj_out = zero_module(proj(inner, in_channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        x_in = x  # (B, C, H, W)
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, D, H, W), D = heads * d_head
        x = rearrange(x, "b c h w -> b (h w) c")  # (B, H*W, D) or (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)  # (B, H*W, D)
        for block in self.transformer_blocks:
            x = block(x, context)  # (B, H*W, D), attending to context (B, L, D_ctx)
        if self.use_linear:
            x = self.proj_out(x)  # (B, H*W, C)
        # (B, C, H, W) in the input's memory format: the permuted view is channels-last, and
        # a convolution handed one would copy its weight to that layout on every call.
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous(
            memory_format=memory_format(x_in)
        )
        if not self.use_linear:
            x = self.proj_out(x)  # (B, C, H, W)
        return x + x_in
