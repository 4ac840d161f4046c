"""What the ImageLogger shows of a diffusion model while it trains, as grids in [-1, 1].

Pixel models: the batch's images and EMA samples. Latent models: the inputs, their
reconstructions through the autoencoder, and EMA samples for the batch's captions, unguided
and guided (unconditional models and image-conditioned ones: unguided only).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.models.diffusion.conditioning import MOMENTS_KEY
from ldm.util import batch_item


@torch.no_grad()
def pixel_previews(model, batch: Mapping, n: int, steps: int) -> dict[str, torch.Tensor]:
    """{"inputs", "samples"}: up to n of the batch's images and as many EMA samples."""
    inputs = model.batch_images(batch)[:n]  # (n, C, H, W)
    with model.ema_scope():
        return {"inputs": inputs, "samples": model.sample(None, len(inputs), steps)}


@torch.no_grad()
def latent_previews(
    model, batch: Mapping, n: int, steps: int, guidance_scale: float
) -> dict[str, object]:
    """{"captions", "inputs", "reconstructions", "samples_cfg1", "samples_cfg<scale>"} for up
    to n items of the batch (a latent cache's batch has no inputs to show)."""
    batch = {k: v[:n] for k, v in batch.items()}
    z, c = model.get_input(batch)  # (n, C, h, w)
    images = {}
    if MOMENTS_KEY not in batch:
        images["inputs"] = model.batch_images(batch)
    images["reconstructions"] = model.decode_first_stage(z)
    with model.ema_scope():
        if model.cond_stage_model is None:
            images["samples"] = model.decode_first_stage(model.sample(None, len(z), steps))
            return images
        if model.model.conditioning_key != "crossattn":  # conditioned on an image: unguided
            images["samples"] = model.decode_first_stage(model.sample(c, len(z), steps))
            return images
        captions = list(batch_item(batch, model.cond_stage_key))
        cond = model.get_learned_conditioning(captions)
        uncond = model.get_learned_conditioning([""] * len(captions))
        images.update(guided_samples(model, cond, uncond, len(captions), steps, guidance_scale))
    return {"captions": captions, **images}


@torch.no_grad()
def guided_samples(
    model, cond, uncond, n: int, steps: int, guidance_scale: float, shape=None
) -> dict[str, torch.Tensor]:
    """{"samples_cfg1", "samples_cfg<scale>"}: n decoded samples for `cond`, unguided and
    guided against `uncond` (latents of `shape` (C, h, w), by default the model's), with the
    weights the caller has in place (its ema_scope)."""
    images = {}
    for scale in (1.0, guidance_scale):
        latents = model.sample(cond, n, steps, scale, uncond, shape=shape)
        images[f"samples_cfg{scale:g}"] = model.decode_first_stage(latents)
    return images
