"""What a model is conditioned on: the conditioning_key a config means and the wrapper that
feeds the UNet by it (`DiffusionWrapper`, still importable from ddpm.py), caption dropout, and
cached text contexts.

Caption dropout is for classifier-free guidance (Ho & Salimans 2022): the model learns the
unconditional prediction from the captions replaced by `val` (the empty caption in SD's
recipe) with probability `p`. A latent cache (`ldm.data.cache`) hands the model the text
encoder's output instead of captions, under the batch keys defined here, which both sides use.
Contexts of chunked long prompts (`long_prompts: chunk`) are padded to a common length with the
empty prompt's context, as the AUTOMATIC1111 web UI does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm.util import KEY_ALIASES, instantiate_from_config

# What the UNet is fed, as the original's DiffusionWrapper: c_concat joins the noisy input's
# channels, c_crossattn is the cross-attention context, c_adm the class label `y` (e.g. the
# x4 upscaler's noise level).
CONDITIONING_KEYS = (None, "crossattn", "concat", "hybrid", "hybrid-adm", "crossattn-adm", "adm")
CONCATS = ("concat", "hybrid", "hybrid-adm")
CROSSATTNS = ("crossattn", "hybrid", "hybrid-adm", "crossattn-adm")

# Batch keys of cached items: LatentDiffusion reads these in place of images and captions.
MOMENTS_KEY, CONTEXT_KEY = "first_stage_moments", "cond_stage_context"
# Each item's weight in the loss (ldm.data.mix.DataMix sets it; 1 when absent).
LOSS_WEIGHT_KEY = "loss_weight"
# Each pixel's weight in the loss, (B, H, W, 1) in [0, 1] (ldm.data.folder's masks).
LOSS_MASK_KEY = "loss_mask"
# SDXL's micro-conditioning of an item (Podell et al. 2023, sec. 2.2), each (2,) as (height,
# width) or (top, left) in pixels: the file's size, the crop's corner in the resized (and
# flipped) image, the crop's size; and the refiner's aesthetic score.
ORIGINAL_SIZE_KEY, CROP_KEY = "original_size_as_tuple", "crop_coords_top_left"
TARGET_SIZE_KEY, AESTHETIC_KEY = "target_size_as_tuple", "aesthetic_score"
# An SDXL conditioner's cached outputs: `conditioner_output.<embedder>.<output>` per item.
CONDITIONER_OUTPUT_KEY = "conditioner_output"


def parse_ucg_training(config: Mapping | None) -> dict[str, dict]:
    """Validate `ucg_training: {key: {p: 0.1, val: ""}}` (caption dropout, as the original)."""
    parsed = {}
    for key, entry in (config or {}).items():
        p = entry.get("p") if isinstance(entry, Mapping) else None
        if not isinstance(p, int | float) or not 0 <= p <= 1 or set(entry) - {"p", "val"}:
            raise ValueError(f"ucg_training.{key}: expected {{p: probability in [0, 1], val: ...}}")
        parsed[key] = {"p": float(p), "val": entry.get("val") or ""}
        parsed[KEY_ALIASES.get(key, key)] = parsed[key]
    return parsed


def drop_mask(n: int, p: float) -> torch.Tensor:
    """(n,) bool, each True with probability p: the captions to drop for CFG training."""
    return torch.rand(n) < p


def drop_conditioning(c: list, p: float, val) -> list:
    """Replace each entry of `c` by `val` with probability p, so the model learns the
    unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022)."""
    drop = drop_mask(len(c), p).tolist()
    return [val if d else item for item, d in zip(c, drop, strict=True)]


def drop_cached_context(
    context: torch.Tensor, p: float, dropped: torch.Tensor, val: str = ""
) -> torch.Tensor:
    """Cached contexts (B, L, D), each replaced by `dropped` (1, L', D), the context of the
    dropout caption `val`, with probability p: caption dropout for a batch from a latent cache.

    Chunked long prompts make L a multiple of the empty caption's L' = 77; as the empty caption
    is one empty chunk, its context is repeated to L (`pad_context`). Another caption's
    context cannot be padded without the encoder, so a length mismatch is refused.
    """
    if dropped.shape[1] != context.shape[1]:
        if val != "":
            raise ValueError(
                f"ucg_training val={val!r}: its context has {dropped.shape[1]} positions, the "
                f"cached contexts {context.shape[1]} (long prompts in chunks); use val: '' "
                "(padded with empty chunks) or rebuild the cache with captions as short as val"
            )
        dropped = pad_context(dropped, context.shape[1], dropped)  # (1, L, D)
    drop = drop_mask(len(context), p).to(context.device)[:, None, None]  # (B, 1, 1)
    return torch.where(drop, dropped.to(context), context)


def pad_context(context: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Context (B, L, D) followed by copies of `empty` (1, E, D), the empty prompt's context
    (one empty chunk), to (B, length, D): how the AUTOMATIC1111 web UI pads the shorter of a
    chunked prompt's cond and uncond."""
    extra = length - context.shape[1]
    if extra == 0:
        return context
    if extra < 0 or extra % empty.shape[1]:
        raise ValueError(
            f"pad_context: a context of {context.shape[1]} positions cannot be padded to "
            f"{length} with empty chunks of {empty.shape[1]}"
        )
    pad = empty.to(context).expand(len(context), -1, -1)  # (B, E, D)
    return torch.cat([context, pad.repeat(1, extra // empty.shape[1], 1)], dim=1)  # (B, length, D)


def match_context_lengths(model, cond, uncond) -> tuple:
    """(cond, uncond) with the shorter context (B, L, D) padded with the empty prompt's context,
    `model.get_learned_conditioning([""])`, so that guidance can batch them: a chunked long
    prompt against the empty or a shorter negative prompt. Other forms pass unchanged."""
    contexts = isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)
    if not contexts or cond.ndim != 3 or cond.shape[1:2] == uncond.shape[1:2]:
        return cond, uncond
    with torch.no_grad():
        empty = model.get_learned_conditioning([""])  # (1, 77, D)
    length = max(cond.shape[1], uncond.shape[1])
    return pad_context(cond, length, empty), pad_context(uncond, length, empty)


def resolve_conditioning_key(cond_stage_config, conditioning_key: str | None, concat_mode: bool):
    """The conditioning_key a LatentDiffusion config means, as the original reads it: unset, it
    is concat (concat_mode, true by default) or crossattn; none for an unconditional model."""
    if cond_stage_config == "__is_unconditional__":
        return None
    if conditioning_key is None:
        return "concat" if concat_mode else "crossattn"
    return conditioning_key


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the checkpoint's `model.diffusion_model.` prefix)."""

    def __init__(self, diff_model_config: Mapping, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key {conditioning_key!r}; expected {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(
        self, x, t, c_concat: list | None = None, c_crossattn: list | None = None, c_adm=None
    ):
        key = self.conditioning_key
        if key in CONCATS:
            x = torch.cat([x, *c_concat], dim=1)  # (B, C + C_cond, H, W)
        context = torch.cat(c_crossattn, dim=1) if key in CROSSATTNS else None  # (B, L, D)
        if key == "adm":
            c_adm = c_crossattn[0]  # the original's class-conditional models: labels as c_crossattn
        if key in ("hybrid-adm", "crossattn-adm", "adm"):
            if c_adm is None:
                raise ValueError(f"conditioning_key {key}: the UNet's class label c_adm is missing")
            return self.diffusion_model(x, t, context=context, y=c_adm)
        return self.diffusion_model(x, t, context=context)
