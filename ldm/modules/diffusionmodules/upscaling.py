"""The low-resolution image conditioning of the SD 2 x4 upscaler, with the original names.

The upscaler concatenates the low-resolution image to the latent; with noise augmentation
(Ho et al. 2021, "Cascaded Diffusion Models", sec. 4.2) that image is first noised to a random
level, which the UNet is told through its class labels (`num_classes`, `y`). The noising
schedule is the image-space one of Ho et al. 2020, registered as `low_scale_model.*` buffers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ldm.models.diffusion import schedule

COMPAT_PARAMS = {
    "to_cuda": "ignored by the original too: the buffers follow the module's .to(), and the "
    "noise levels follow the input's device",
}
# The buffers the original registers, by name; all persistent, so checkpoints carry them.
BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)


class AbstractLowScaleModel(nn.Module):
    """Holds the noise schedule of the image concatenated to the latent, and noises it."""

    def __init__(self, noise_schedule_config: dict | None = None):
        super().__init__()
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(
        self,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Register the original's float32 schedule buffers (BUFFER_NAMES), of `timesteps`."""
        betas = schedule.make_beta_schedule(
            beta_schedule, timesteps, linear_start, linear_end, cosine_s=cosine_s
        )
        buffers = schedule.schedule_buffers(betas)
        for name in BUFFER_NAMES:
            self.register_buffer(name, buffers[name].float())
        self.num_timesteps = timesteps

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_start (B, C, H, W) noised to levels t (B,); fresh Gaussian noise unless given."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return schedule.q_sample(x_start, t, noise, self.alphas_cumprod)


class SimpleImageConcat(AbstractLowScaleModel):
    """Concatenate the image as it is: noise level 0 for every item."""

    def __init__(self):
        super().__init__(noise_schedule_config=None)
        self.max_noise_level = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, C, H, W), zeros (B,) long)."""
        return x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """Noise the image to a level in [0, max_noise_level) (random per item unless given)."""

    def __init__(
        self, noise_schedule_config: dict, max_noise_level: int = 1000, to_cuda: bool = False
    ):
        super().__init__(noise_schedule_config=noise_schedule_config)
        if not 0 < max_noise_level <= self.num_timesteps:
            raise ValueError(
                f"ImageConcatWithNoiseAugmentation: max_noise_level must be in "
                f"(0, {self.num_timesteps}] (the schedule's timesteps), got {max_noise_level}"
            )
        if to_cuda:
            warnings.warn(
                "ImageConcatWithNoiseAugmentation: to_cuda is ignored "
                f"({COMPAT_PARAMS['to_cuda']}); move the module with .to(device) instead",
                UserWarning,
                stacklevel=2,
            )
        self.max_noise_level = max_noise_level

    def forward(
        self, x: torch.Tensor, noise_level: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, C, H, W) noised to noise_level, noise_level (B,) long)."""
        if noise_level is None:
            shape = (x.shape[0],)
            noise_level = torch.randint(0, self.max_noise_level, shape, device=x.device)
        elif not isinstance(noise_level, torch.Tensor):
            raise TypeError(
                f"ImageConcatWithNoiseAugmentation: noise_level must be a (B,) tensor or None, "
                f"got {type(noise_level).__name__}"
            )
        return self.q_sample(x, noise_level), noise_level
