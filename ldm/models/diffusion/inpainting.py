"""SD's inpainting models: a latent diffusion whose UNet also sees the mask and the masked image.

`LatentInpaintDiffusion` (configs name it `ldm.models.diffusion.ddpm.LatentInpaintDiffusion`,
as runwayml's and Stability-AI's) trains and samples with `conditioning_key: hybrid`: the
UNet's input is the noisy latent (4 channels), the mask resized to the latent grid (1) and the
masked image's latent (4), 9 channels in all, with the caption's context through
cross-attention. A mask is 1 where the image is to be painted and 0 where it is kept; the
masked image is the image with the painted part set to 0 (grey in [-1, 1]).

`finetune_keys` turns a text-to-image file into an inpainting model as the original does: the
named weights (the UNet's first convolution and its EMA) keep the file's first
`keep_finetune_dims` input channels, and the new ones start at zero, so that the model begins
as the text-to-image one and learns to use the mask.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ldm.models.diffusion import previews
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.util import ConfigError, batch_item

logger = logging.getLogger(__name__)

FINETUNE_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model_ema.diffusion_modelinput_blocks00weight",
)


class LatentFinetuneDiffusion(LatentDiffusion):
    """A LatentDiffusion whose UNet also takes the batch's `concat_keys` as input channels.

    Args:
        concat_keys: batch keys of (B, H, W, C) images concatenated to the noisy latent.
        finetune_keys: weights whose extra input channels a narrower file lacks (zero-filled);
            None takes a file's weights only as they are.
        keep_finetune_dims: how many input channels such a file has (the latent's).
        c_concat_log_start, c_concat_log_end: the channels of c_concat that log_images shows.
    """

    def __init__(
        self,
        concat_keys: Sequence[str],
        finetune_keys: Sequence[str] | None = FINETUNE_KEYS,
        keep_finetune_dims: int = 4,
        c_concat_log_start: int | None = None,
        c_concat_log_end: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if self.cond_stage_trainable:
            raise ConfigError(f"{type(self).__name__}: cond_stage_trainable is not supported")
        self.concat_keys = list(concat_keys)
        self.finetune_keys = set(finetune_keys or ())
        self.keep_dims = keep_finetune_dims
        self.c_concat_log_start, self.c_concat_log_end = c_concat_log_start, c_concat_log_end

    supported_conditioning = ("hybrid",)

    def adapt_weights(self, state_dict: dict, path: str) -> dict:
        """Zero-fill the extra input channels of `finetune_keys` that the file lacks."""
        own = self.state_dict()
        for key in self.finetune_keys & set(state_dict) & set(own):
            weight, target = state_dict[key], own[key]
            if weight.shape == target.shape:
                continue
            if weight.shape[1] != self.keep_dims or weight.shape[2:] != target.shape[2:]:
                raise ConfigError(
                    f"{path}: {key} has shape {tuple(weight.shape)}, neither this model's "
                    f"{tuple(target.shape)} nor one with keep_finetune_dims={self.keep_dims} "
                    "input channels to widen"
                )
            widened = torch.zeros_like(target)
            widened[:, : self.keep_dims] = weight
            state_dict = {**state_dict, key: widened}
            logger.info(
                "%s: %s widened from %d to %d input channels (the new ones start at zero)",
                path,
                key,
                self.keep_dims,
                target.shape[1],
            )
        return state_dict


class LatentInpaintDiffusion(LatentFinetuneDiffusion):
    """SD's inpainting model: c_concat is [mask on the latent grid, the masked image's latent].

    Batches hold `image`, a `mask` (B, H, W, 1) in [0, 1] (1: paint) and a `masked_image`
    (B, H, W, 3) in [-1, 1] besides the caption (`ldm.data.inpainting.InpaintingMasks` makes
    them).
    """

    def __init__(
        self,
        concat_keys: Sequence[str] = ("mask", "masked_image"),
        masked_image_key: str = "masked_image",
        **kwargs,
    ):
        if masked_image_key not in concat_keys:
            raise ConfigError(
                f"LatentInpaintDiffusion: masked_image_key {masked_image_key!r} must be one of "
                f"concat_keys {list(concat_keys)}"
            )
        super().__init__(concat_keys=concat_keys, **kwargs)
        self.masked_image_key = masked_image_key

    def get_input(self, batch: Mapping, key: str | None = None) -> tuple[torch.Tensor, dict]:
        """(z, {"c_concat": [(B, 1 + 4, h, w)], "c_crossattn": [context]}), as the original."""
        z, context = super().get_input(batch, key)
        return z, {"c_concat": [self.concat_input(batch, z.shape[-2:])], "c_crossattn": [context]}

    @torch.no_grad()
    def concat_input(self, batch: Mapping, size) -> torch.Tensor:
        """The concat_keys' images on the latent grid `size`: the masked image encoded (a
        posterior sample, scaled), the others (the mask) resized, nearest."""
        parts = []
        for key in self.concat_keys:
            image = self.batch_images(batch, key).to(self.device).float()  # (B, C, H, W)
            if key == self.masked_image_key:
                parts.append(self.get_first_stage_encoding(self.encode_first_stage(image)))
            else:
                parts.append(F.interpolate(image, size=tuple(size)))
        return torch.cat(parts, dim=1)  # (B, C_concat, h, w)

    @torch.no_grad()
    def log_images(
        self, batch: Mapping, n: int = 8, steps: int = 20, guidance_scale: float = 3.0
    ) -> dict[str, object]:
        """Inputs, masked inputs, and EMA inpaintings unguided and guided."""
        batch = {k: v[:n] for k, v in batch.items()}
        z, cond = self.get_input(batch)
        captions = list(batch_item(batch, self.cond_stage_key))
        uncond = {**cond, "c_crossattn": [self.get_learned_conditioning([""] * len(captions))]}
        images = {
            "inputs": self.batch_images(batch),
            "masked_inputs": self.batch_images(batch, self.masked_image_key),
        }
        with self.ema_scope():
            samples = previews.guided_samples(
                self, cond, uncond, len(z), steps, guidance_scale, z.shape[1:]
            )
        images.update(samples)
        return {"captions": captions, **images}
