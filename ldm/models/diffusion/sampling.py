"""One door to sampling: a sampler by name over the model's own timesteps, guided, or img2img.

txt2img, img2img, the evaluation, `LatentDiffusion.sample` and the benchmarks sample through
`sample` / `img2img`. The CompVis adapters (`DDIMSampler`, ...) are built from the same pieces:
`cfg_eps_fn`, `model_timesteps` and the sampler functions. img2img is SDEdit (Meng et al. 2022,
https://arxiv.org/abs/2108.01073) on the DDIM grid, as the original script.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import sample_ddim
from ldm.models.diffusion.dpm_solver import sample_dpmpp_2m
from ldm.models.diffusion.guidance import cfg_eps_fn
from ldm.models.diffusion.plms import sample_plms
from ldm.models.diffusion.sampler_api import model_timesteps

# Each sampler function, and what it takes besides (eps_fn, x, timesteps, alphas_cumprod).
SAMPLERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "ddim": (sample_ddim, ("eta", "generator")),
    "plms": (sample_plms, ()),
    "dpm": (sample_dpmpp_2m, ()),
}


def sampler_options(
    name: str, *, eta: float = 0.0, generator: torch.Generator | None = None
) -> tuple[Callable, dict]:
    """(sampler function, its keyword options); eta other than 0 is refused where not taken."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    sample_fn, takes = SAMPLERS[name]
    if eta and "eta" not in takes:
        raise ValueError(
            f"sampler {name!r} takes no eta (got {eta}): {name} is deterministic, eta is DDIM's"
        )
    given = {"eta": eta, "generator": generator}
    return sample_fn, {option: given[option] for option in takes}


def start_shape(model, batch_size: int | None, shape) -> tuple[int, ...]:
    """(B, C, H, W) of the start noise: shape (C, H, W) defaults to the model's own."""
    if batch_size is None:
        raise ValueError("sample: give batch_size or x_T")
    return (batch_size, *(shape or (model.channels, model.image_size, model.image_size)))


@torch.no_grad()
def sample(
    model,
    cond,
    uncond=None,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    x_T: Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    timestep_spacing: str | None = None,
    callback=None,
    disable: bool = True,
) -> Tensor:
    """Latents (B, C, H, W) from x_T (else fresh noise) by `sampler` over `steps` steps.

    Guided when uncond is given and guidance_scale != 1 (Ho & Salimans 2022); guidance_rescale
    is Lin et al.'s phi. Timesteps follow the model's `timestep_spacing` unless
    `timestep_spacing` says otherwise. `callback` gets each step's {"i", "t", "x", "x0"}.
    """
    sample_fn, options = sampler_options(sampler, eta=eta, generator=generator)
    timesteps = model_timesteps(model, steps, timestep_spacing)  # (S,) descending
    if x_T is None:
        noise_shape = start_shape(model, batch_size, shape)
        x_T = torch.randn(noise_shape, generator=generator, device=model.device)
    eps_fn = cfg_eps_fn(model, cond, uncond, guidance_scale, guidance_rescale)
    ac = model.alphas_cumprod
    return sample_fn(eps_fn, x_T, timesteps, ac, callback=callback, disable=disable, **options)


@torch.no_grad()
def img2img(
    model,
    z0: Tensor,
    cond,
    uncond=None,
    *,
    strength: float,
    sampler: str = "ddim",
    steps: int = 50,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    timestep_spacing: str | None = None,
    callback=None,
    disable: bool = True,
) -> Tensor:
    """Latents redrawn from z0 (B, C, H, W): noised `strength` of the way, then denoised.

    The t_enc = round(strength * steps) lowest steps are run: 0 gives z0 back, `steps` starts
    from pure noise. As the original (`DDIMSampler.stochastic_encode` then `decode`), z0 is
    noised to the level one step above the first step taken.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img: strength {strength} must lie in [0, 1]")
    sample_fn, options = sampler_options(sampler, eta=eta, generator=generator)
    t_enc = round(strength * steps)
    if t_enc == 0:
        return z0
    timesteps = model_timesteps(model, steps, timestep_spacing)  # (S,) descending
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    x = noise
    if t_enc < steps:  # the level of ascending grid index t_enc
        t_start = torch.full(z0.shape[:1], int(timesteps[-1 - t_enc]), device=z0.device)  # (B,)
        x = schedule.q_sample(z0, t_start, noise, model.alphas_cumprod)
    eps_fn = cfg_eps_fn(model, cond, uncond, guidance_scale, guidance_rescale)
    ac, remaining = model.alphas_cumprod, timesteps[len(timesteps) - t_enc :]
    return sample_fn(eps_fn, x, remaining, ac, callback=callback, disable=disable, **options)
