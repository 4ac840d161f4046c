"""SD 2's x4 upscaler: a latent diffusion whose UNet also sees the low-resolution image.

`LatentUpscaleDiffusion` (configs name it `ldm.models.diffusion.ddpm.LatentUpscaleDiffusion`,
as Stability-AI's x4-upscaling.yaml) trains and samples with `conditioning_key: hybrid-adm`:
the UNet's input is the noisy latent (4 channels) and the low-resolution image at the latent
grid's size (3), the caption's context goes through cross-attention, and the level of noise
added to the low-resolution image (noise augmentation, Ho et al. 2021, "Cascaded Diffusion
Models", sec. 4.2) is the UNet's class label. The image is noised by the frozen
`low_scale_model` (`ldm.modules.diffusionmodules.upscaling`), whose schedule buffers are part
of the checkpoint (`low_scale_model.*`). Training draws a random level per item; sampling
fixes one (`upscale_conditions`; diffusers' default is 20).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.models.diffusion import previews
from ldm.models.diffusion.latent import LatentDiffusion, frozen
from ldm.util import ConfigError, batch_item, instantiate_from_config

# The noise level log_images upscales at: diffusers' StableDiffusionUpscalePipeline default.
LOG_NOISE_LEVEL = 20
LOW_SCALE_PREFIX = "low_scale_model."


class LatentUpscaleDiffusion(LatentDiffusion):
    """SD's latent upscaler: c_concat is the noised low-res image, c_adm its noise level.

    Batches hold `image` (B, H, W, 3) and, under `low_scale_key`, the low-res image
    (B, H / f, W / f, 3) in [-1, 1], f the first stage's factor (`ldm.data.lowres` makes it).

    Args:
        low_scale_config: the `{target, params}` of the model that noises the low-res image.
        low_scale_key: the batch key of the low-res images.
        noise_level_key: a batch key of (B,) noise levels to use instead of random ones.
    """

    def __init__(
        self,
        low_scale_config: Mapping,
        low_scale_key: str = "LR",
        noise_level_key: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if self.encodes_in_forward:
            raise ConfigError(
                "LatentUpscaleDiffusion: the text encoder must be frozen (cond_stage_trainable: "
                "false, no lora_config.text_encoder), as the original's"
            )
        self.low_scale_model = frozen(instantiate_from_config(low_scale_config))
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key

    supported_conditioning = ("hybrid-adm",)

    @property
    def max_noise_level(self) -> int:
        """The highest noise level the low-res image is trained with (0: never noised)."""
        return self.low_scale_model.max_noise_level

    def train(self, mode: bool = True) -> LatentUpscaleDiffusion:
        """Train the UNet; the low-scale model stays in eval mode with the other frozen stages."""
        super().train(mode)
        self.low_scale_model.eval()
        return self

    def computed_keys(self) -> list[str]:
        """The low-scale model's schedule comes from the config too: a file may lack it."""
        return [*super().computed_keys(), LOW_SCALE_PREFIX]

    def get_input(self, batch: Mapping, key: str | None = None) -> tuple[torch.Tensor, dict]:
        """(z, {"c_concat": [noised low-res (B, 3, h, w)], "c_crossattn": [context],
        "c_adm": noise levels (B,)}), as the original; the levels are random in
        [0, max_noise_level) unless the batch has them under `noise_level_key`."""
        z, context = super().get_input(batch, key)
        image_size = tuple(batch_item(batch, key or self.first_stage_key).shape[1:3])  # (H, W)
        low_res = self.low_res_images(batch, z.shape[-2:], image_size)  # (B, 3, h, w)
        levels = None if self.noise_level_key is None else self.batch_noise_levels(batch)
        noised, levels = self.noise_low_res(low_res, levels)
        return z, {"c_concat": [noised], "c_crossattn": [context], "c_adm": levels}

    def low_res_images(self, batch: Mapping, latent_size, image_size) -> torch.Tensor:
        """The batch's low-res images (B, 3, h, w), which must be at the latent grid's size."""
        low_res = self.batch_images(batch, self.low_scale_key).to(self.device)
        if tuple(low_res.shape[-2:]) != tuple(latent_size):
            (h, w), (height, width) = latent_size, image_size
            raise ValueError(
                f"batch key {self.low_scale_key!r}: the low-res images are "
                f"{low_res.shape[-2]}x{low_res.shape[-1]} px, but the {height}x{width} images' "
                f"latents are {h}x{w}: the upscaler feeds the low-res image at the latent grid, "
                f"so it must be the image's size / {height // h} (the first stage's factor)"
            )
        return low_res

    def batch_noise_levels(self, batch: Mapping) -> torch.Tensor:
        """The batch's (B,) integer noise levels under `noise_level_key`, checked."""
        levels = torch.as_tensor(batch_item(batch, self.noise_level_key), device=self.device)
        if levels.ndim != 1 or levels.is_floating_point():
            raise ValueError(
                f"batch key {self.noise_level_key!r} (noise_level_key): expected (B,) integer "
                f"noise levels, got {levels.dtype} of shape {tuple(levels.shape)}"
            )
        for level in (levels.min(), levels.max()):
            self.check_noise_level(int(level), f"batch key {self.noise_level_key!r}")
        return levels.long()

    def check_noise_level(self, level: int, name: str = "noise_level") -> int:
        """`level` if it is in [0, max_noise_level] (diffusers' range), else a named error."""
        if not 0 <= level <= self.max_noise_level:
            raise ValueError(
                f"{name}: noise level {level} is outside [0, {self.max_noise_level}], the "
                "range of the low-scale model (low_scale_config's max_noise_level)"
            )
        return level

    def noise_low_res(
        self, low_res: torch.Tensor, levels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(low_res (B, 3, h, w) noised to `levels`, levels (B,)); random levels when None.
        A low-scale model without noise (max_noise_level 0) returns the image as it is."""
        if levels is None or self.max_noise_level == 0:
            return self.low_scale_model(low_res)
        return self.low_scale_model(low_res, levels)

    @torch.no_grad()
    def upscale_conditions(
        self,
        low_res: torch.Tensor,
        context: torch.Tensor,
        noise_level: int,
        uncond_context: torch.Tensor | None = None,
    ) -> tuple[dict, dict | None]:
        """(cond, uncond or None) to sample upscales of `low_res` (B, 3, h, w) in [-1, 1].

        The image is noised once, at the fixed `noise_level`, and cond and uncond share it (as
        diffusers' upscale pipeline): guidance acts on the text only. `context` and
        `uncond_context` are the text encoder's (B, L, D) outputs.
        """
        self.check_noise_level(noise_level)
        levels = torch.full((len(low_res),), noise_level, dtype=torch.long, device=low_res.device)
        noised, levels = self.noise_low_res(low_res, levels)
        cond = {"c_concat": [noised], "c_crossattn": [context], "c_adm": levels}
        uncond = None if uncond_context is None else {**cond, "c_crossattn": [uncond_context]}
        return cond, uncond

    @torch.no_grad()
    def log_images(
        self,
        batch: Mapping,
        n: int = 8,
        steps: int = 20,
        guidance_scale: float = 3.0,
        noise_level: int = LOG_NOISE_LEVEL,
    ) -> dict[str, object]:
        """Inputs, low-res inputs, and EMA upscales unguided and guided, the low-res image noised
        to `noise_level` (capped at max_noise_level: 0 for a low-scale model without noise)."""
        batch = {k: v[:n] for k, v in batch.items()}
        images = {"inputs": self.batch_images(batch).to(self.device)}  # (n, 3, H, W)
        z = self.get_first_stage_encoding(self.first_stage_posterior(batch))  # (n, C, h, w)
        low_res = self.low_res_images(batch, z.shape[-2:], images["inputs"].shape[-2:])
        images["low_res_inputs"] = low_res
        captions = list(batch_item(batch, self.cond_stage_key))
        context = self.get_learned_conditioning(captions)
        empty = self.get_learned_conditioning([""] * len(captions))
        level = min(noise_level, self.max_noise_level)
        cond, uncond = self.upscale_conditions(low_res, context, level, empty)
        with self.ema_scope():
            samples = previews.guided_samples(
                self, cond, uncond, len(z), steps, guidance_scale, z.shape[1:]
            )
        images.update(samples)
        return {"captions": captions, **images}
