"""The cross-attention UNet of Stable Diffusion v1/v2 and SDXL, with the original module names.

Ronneberger et al. 2015 (U-Net); Dhariwal & Nichol 2021 (ADM blocks); Rombach et al. 2022 (LDM);
Podell et al. 2023 (SDXL: per-level transformer depth, size and crop vectors through label_emb).
The order in which blocks are appended fixes the `input_blocks.{i}.{j}` checkpoint indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    Conv2d,
    maybe_checkpoint,
    normalization,
    timestep_embedding,
    zero_module,
)
from ldm.util import reject_unsupported, to_dtype_of

COMPAT_PARAMS = {
    "image_size": "unused by the original too; the UNet is fully convolutional",
    "use_fp16": "the original only cast inputs and relied on autocast; precision is chosen by "
    "the Trainer's `precision` or the sampler's autocast",
    "spatial_transformer_attn_type": "generative-models' choice of softmax kernel ('softmax' or "
    "'softmax-xformers', the same attention); scaled_dot_product_attention picks the kernel here",
}
# The attention kernels generative-models names; both are plain softmax attention.
ATTN_TYPES = frozenset({"softmax", "softmax-xformers"})


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding and context to the layers that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttentionBlock(nn.Module):
    """Self-attention over the pixels with 1-d conv projections: the original's attention for
    UNets without cross-attention (`use_spatial_transformer: false`, e.g. unconditional LDMs).

    The qkv channels are ordered per head ([q k v] of head 0, then head 1, ...: the original's
    "legacy" order) or, with `new_order`, as [all q | all k | all v].
    """

    def __init__(self, channels: int, num_heads: int, use_checkpoint: bool, new_order: bool):
        super().__init__()
        self.num_heads, self.new_order, self.use_checkpoint = num_heads, new_order, use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(x_flat))  # (B, 3C, T)
        order = "(three heads d)" if self.new_order else "(heads three d)"
        q, k, v = rearrange(qkv, f"b {order} t -> three b heads t d", three=3, heads=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        out = self.proj_out(rearrange(out, "b heads t d -> b (heads d) t"))
        return (x_flat + out).reshape(b, c, h, w)


class ResBlock(nn.Module):
    """Residual block; the time embedding is added (or scales and shifts) after the first conv."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        same = out_channels == channels
        self.skip_connection = nn.Identity() if same else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]  # (B, C or 2C, 1, 1)
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def check_attention_params(
    spatial: bool, context_dim: int | None, num_heads: int, num_head_channels: int
) -> None:
    """Raise, naming the param, on attention settings the blocks cannot be built from."""
    if spatial and not isinstance(context_dim, int):
        raise ValueError(
            f"UNetModel: use_spatial_transformer needs an int context_dim, got {context_dim!r}"
        )
    if (num_heads == -1) == (num_head_channels == -1):
        raise ValueError("UNetModel: set exactly one of num_heads and num_head_channels")


def check_disable_self_attentions(disable: list[bool], channel_mult: list[int]) -> None:
    """Raise unless disable_self_attentions has one flag per level, as the original indexes it."""
    if len(disable) != len(channel_mult):
        raise ValueError(
            f"UNetModel: disable_self_attentions needs one bool per channel_mult level "
            f"({len(channel_mult)}), got {list(disable)!r}"
        )


def per_level(name: str, value: int | list[int], levels: int) -> list[int]:
    """One int per channel_mult level: an int for all of them, or a list of `levels` ints."""
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(
            f"UNetModel: {name} must be an int or a list of {levels} ints (one per channel_mult "
            f"level), got {value!r}"
        )
    return values


def middle_depth(transformer_depth_middle: int | None, depths: list[int]) -> int:
    """The middle block's transformer depth: as given, or the last level's."""
    if transformer_depth_middle is None:
        return depths[-1]
    return per_level("transformer_depth_middle", transformer_depth_middle, 1)[0]


def one_context_dim(context_dim: int | list[int] | None) -> int | None:
    """The cross-attention width: an int, or generative-models' per-block list (the SDXL
    refiner's [1280, 1280, 1280, 1280]), whose entries must agree, as there."""
    if context_dim is None or isinstance(context_dim, int):
        return context_dim
    dims = set(context_dim)
    if len(dims) != 1:
        raise ValueError(
            f"UNetModel: a context_dim list must repeat one width (every transformer block "
            f"attends to the same context), got {list(context_dim)!r}"
        )
    return dims.pop()


def check_attention_blocks(counts: list[int] | None, num_res_blocks: list[int]) -> None:
    """Raise unless num_attention_blocks has, per level, at most that level's res blocks."""
    if counts is None:
        return
    if len(counts) != len(num_res_blocks) or any(
        not isinstance(n, int) or not 0 <= n <= most
        for n, most in zip(counts, num_res_blocks, strict=True)
    ):
        raise ValueError(
            f"UNetModel: num_attention_blocks needs one int per level, each at most that "
            f"level's num_res_blocks {num_res_blocks}; got {list(counts)!r}"
        )


def make_label_emb(
    num_classes: int | str | None, adm_in_channels: int | None, emb_dim: int
) -> nn.Module | None:
    """The original's `label_emb`, whose output is added to the time embedding (B, emb_dim):
    an nn.Embedding of int class ids, a Linear of one float ("continuous"), or an MLP of
    (B, adm_in_channels) vectors ("sequential": SDXL's size and crop conditioning, unCLIP)."""
    if adm_in_channels is not None and num_classes != "sequential":
        raise ValueError(
            f"UNetModel: adm_in_channels is read only with num_classes='sequential', "
            f"got num_classes={num_classes!r}"
        )
    if num_classes is None:
        return None
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0:
        return nn.Embedding(num_classes, emb_dim)
    if num_classes == "continuous":
        return nn.Linear(1, emb_dim)
    if num_classes == "sequential":
        if not isinstance(adm_in_channels, int):
            raise ValueError("UNetModel: num_classes='sequential' needs an int adm_in_channels")
        mlp = nn.Sequential(
            nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        return nn.Sequential(mlp)  # nested, for the original's `label_emb.0.{0,2}` keys
    raise ValueError(
        f"UNetModel: num_classes must be a positive int, 'continuous' or 'sequential'; "
        f"got {num_classes!r}"
    )


class UNetModel(nn.Module):
    """The SD UNet: `forward(x (B,C,H,W), timesteps (B,), context (B,L,D), y) -> (B,C_out,H,W)`,
    with `y` the class labels or ADM vectors of a model with num_classes (see make_label_emb).

    SD's and generative-models' params. Beyond SD's: `num_res_blocks` and `transformer_depth`
    may be per-level lists, `transformer_depth_middle` defaults to the last level's depth,
    `num_attention_blocks` caps the attention blocks of each level, and
    `use_spatial_transformer` defaults to whether a context_dim is given (generative-models
    dropped the flag and always cross-attends).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | list[int],
        attention_resolutions: list[int],
        dropout: float = 0.0,
        channel_mult: list[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool | None = None,
        transformer_depth: int | list[int] = 1,
        context_dim: int | list[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: list[bool] | None = None,
        num_attention_blocks: list[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
        transformer_depth_middle: int | None = None,
        spatial_transformer_attn_type: str = "softmax",
        image_size: int | None = None,
    ):
        super().__init__()
        reject_unsupported(
            "UNetModel",
            {
                "conv_resample": (conv_resample, True),
                "dims": (dims, 2),
                "resblock_updown": (resblock_updown, False),
                "n_embed": (n_embed, None),
                "spatial_transformer_attn_type": (spatial_transformer_attn_type, ATTN_TYPES),
            },
        )
        context_dim = one_context_dim(context_dim)
        if use_spatial_transformer is None:
            use_spatial_transformer = context_dim is not None
        check_attention_params(use_spatial_transformer, context_dim, num_heads, num_head_channels)
        levels = len(channel_mult)
        self.model_channels = model_channels
        self.num_res_blocks = per_level("num_res_blocks", num_res_blocks, levels)
        self.transformer_depth = per_level("transformer_depth", transformer_depth, levels)
        check_attention_blocks(num_attention_blocks, self.num_res_blocks)
        self.num_attention_blocks = num_attention_blocks
        self.channel_mult = list(channel_mult)
        self.attention_resolutions = set(attention_resolutions)
        self.disable_self_attentions = disable_self_attentions or [False] * levels
        check_disable_self_attentions(self.disable_self_attentions, channel_mult)
        self.num_classes, self.adm_in_channels = num_classes, adm_in_channels
        self.block_kwargs = dict(dropout=dropout, use_checkpoint=use_checkpoint)
        self.resblock_kwargs = dict(use_scale_shift_norm=use_scale_shift_norm)
        self.attn_kwargs = dict(
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            context_dim=context_dim,
            use_linear=use_linear_in_transformer,
            spatial=use_spatial_transformer,
            new_order=use_new_attention_order,
            # The original's decoder AttentionBlocks took num_heads_upsample only in this case.
            heads_upsample=num_heads_upsample if legacy and num_head_channels == -1 else -1,
        )
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self.label_emb = make_label_emb(num_classes, adm_in_channels, time_embed_dim)
        self.input_blocks, skip_channels = self._make_input_blocks(in_channels, time_embed_dim)
        ch = model_channels * self.channel_mult[-1]
        depth = middle_depth(transformer_depth_middle, self.transformer_depth)
        self.middle_block = self._make_middle_block(
            ch, time_embed_dim, disable_middle_self_attn, depth
        )
        self.output_blocks = self._make_output_blocks(skip_channels, time_embed_dim)
        self.out = nn.Sequential(
            normalization(model_channels),
            nn.SiLU(),
            zero_module(Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def _resblock(self, ch: int, emb_dim: int, out_ch: int) -> ResBlock:
        return ResBlock(
            ch, emb_dim, out_channels=out_ch, **self.block_kwargs, **self.resblock_kwargs
        )

    def _attention(
        self, ch: int, disable_self_attn: bool, depth: int, decoder: bool = False
    ) -> nn.Module:
        """A SpatialTransformer of `depth` blocks (cross-attention) or a self-attention block."""
        kw = self.attn_kwargs
        heads = kw["num_heads"] if kw["num_head_channels"] == -1 else ch // kw["num_head_channels"]
        if not kw["spatial"]:
            if decoder and kw["heads_upsample"] != -1:
                heads = kw["heads_upsample"]
            return AttentionBlock(
                ch, heads, self.block_kwargs["use_checkpoint"], new_order=kw["new_order"]
            )
        return SpatialTransformer(
            ch,
            heads,
            ch // heads,
            depth=depth,
            dropout=self.block_kwargs["dropout"],
            context_dim=kw["context_dim"],
            disable_self_attn=disable_self_attn,
            use_linear=kw["use_linear"],
            use_checkpoint=self.block_kwargs["use_checkpoint"],
        )

    def _make_input_blocks(self, in_channels: int, emb_dim: int) -> tuple[nn.ModuleList, list]:
        ch = self.model_channels
        blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks[level]):
                layers = [self._resblock(ch, emb_dim, mult * self.model_channels)]
                ch = mult * self.model_channels
                if self._attends(level, ds, i):
                    layers.append(self._level_attention(ch, level))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        return blocks, skip_channels

    def _attends(self, level: int, ds: int, index: int) -> bool:
        """Whether the `index`-th res block of `level`, at downsampling `ds`, has attention."""
        counts = self.num_attention_blocks
        return ds in self.attention_resolutions and (counts is None or index < counts[level])

    def _level_attention(self, ch: int, level: int, decoder: bool = False) -> nn.Module:
        disable = self.disable_self_attentions[level]
        return self._attention(ch, disable, self.transformer_depth[level], decoder=decoder)

    def _make_middle_block(self, ch: int, emb_dim: int, disable_self_attn: bool, depth: int):
        return TimestepEmbedSequential(
            self._resblock(ch, emb_dim, ch),
            self._attention(ch, disable_self_attn, depth),
            self._resblock(ch, emb_dim, ch),
        )

    def _make_output_blocks(self, skip_channels: list[int], emb_dim: int) -> nn.ModuleList:
        skip_channels = list(skip_channels)
        blocks = nn.ModuleList()
        ch = self.model_channels * self.channel_mult[-1]
        ds = 2 ** (len(self.channel_mult) - 1)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks[level] + 1):
                layers = [
                    self._resblock(ch + skip_channels.pop(), emb_dim, mult * self.model_channels)
                ]
                ch = mult * self.model_channels
                if self._attends(level, ds, i):
                    layers.append(self._level_attention(ch, level, decoder=True))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks

    def _check_y(self, y: torch.Tensor | None, batch: int) -> None:
        """Raise unless `y` is given exactly when num_classes is set, shaped as label_emb takes."""
        if self.num_classes is None:
            if y is not None:
                raise ValueError("UNetModel: got class labels `y`, but num_classes is not set")
            return
        if self.num_classes == "sequential":
            shape, what = (batch, self.adm_in_channels), "(B, adm_in_channels) floats"
        elif self.num_classes == "continuous":
            shape, what = (batch, 1), "(B, 1) floats"
        else:
            shape, what = (batch,), "(B,) integer class ids"
        ids = not isinstance(self.num_classes, str)  # nn.Embedding takes integers only
        if y is None or tuple(y.shape) != shape or y.is_floating_point() == ids:
            got = None if y is None else f"{tuple(y.shape)} {y.dtype}"
            raise ValueError(
                f"UNetModel: num_classes={self.num_classes!r} needs y as {what}, "
                f"{shape} here; got {got}"
            )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_y(y, x.shape[0])
        t_emb = to_dtype_of(self.time_embed, timestep_embedding(timesteps, self.model_channels))
        emb = self.time_embed(t_emb)  # (B, 4 mc)
        if self.label_emb is not None:
            emb = emb + self.label_emb(to_dtype_of(self.label_emb, y))  # (B, 4 mc)
        skips, h = [], x  # x: (B, C_in, H, W)
        for block in self.input_blocks:
            h = block(h, emb, context)  # (B, mc * mult, H / 2^level, W / 2^level)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, mc * mult[-1], H / 2^L, W / 2^L)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # up to (B, mc, H, W)
        return self.out(h)  # (B, C_out, H, W)
