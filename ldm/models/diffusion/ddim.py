"""DDIM sampling over SD's discrete timesteps, and the original `DDIMSampler` API as an adapter.

Song et al. 2021, "Denoising Diffusion Implicit Models" (https://arxiv.org/abs/2010.02502).
Timesteps are passed in sampling order (descending); after the last one the sampler steps to
`final_alpha`, by default alphas_cumprod[0] as in the original (diffusers' set_alpha_to_one=False).
The timestep grids are `schedule.py`'s; the adapter's base, shared with PLMS and DPM-Solver, is
`sampler_api.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.models.diffusion import schedule
from ldm.models.diffusion.guidance import EpsFn, cfg_eps_fn
from ldm.models.diffusion.sampler_api import OriginalSampler, original_sample


def ddim_sigma(a_t: Tensor, a_prev: Tensor, eta: float) -> Tensor:
    """sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) (Song et al., eq. 16)."""
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def ddim_step(
    x_t: Tensor, eps: Tensor, a_t: Tensor, a_prev: Tensor, eta: float, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One DDIM step to a_prev (Song et al. 2021, eq. 12); returns (x_prev, predicted x0)."""
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sigma = ddim_sigma(a_t, a_prev, eta)
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    return (x_prev if noise is None else x_prev + sigma * noise), x0


def stochastic_encode(x0: Tensor, t_index: Tensor, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """x0 noised to the levels alphas_cumprod[t_index] (Ho et al. 2020, eq. 4): img2img's start."""
    return schedule.q_sample(x0, t_index, noise, alphas_cumprod)


def sample_ddim(
    eps_fn: EpsFn,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    eta: float = 0.0,
    final_alpha: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
) -> Tensor:
    """DDIM from x at timesteps[0] down `timesteps`; one noise draw per step when eta > 0.

    `callback` gets {"i", "t", "x": the sample after step i, "x0": its predicted x0}.
    """
    a_t, a_prev = schedule.alphas_along(timesteps, alphas_cumprod, final_alpha)
    for i, t in enumerate(tqdm(timesteps.tolist(), disable=disable)):
        eps = eps_fn(x, x.new_full(x.shape[:1], t, dtype=torch.long))  # t: (B,)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, x0 = ddim_step(x, eps, a_t[i], a_prev[i], eta, noise)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


class DDIMSampler(OriginalSampler):
    """The original CompVis `DDIMSampler` API over `sample_ddim` (no math here)."""

    sample_fn = staticmethod(sample_ddim)

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str | None = None,
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """The base's timesteps, with DDIM's sigmas for ddim_eta (Song et al., eq. 16)."""
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)
        self.ddim_sigmas = ddim_sigma(self.ddim_alphas, self.ddim_alphas_prev, ddim_eta)

    def sample_fn_kwargs(self, eta: float, generator: torch.Generator | None) -> dict:
        return {"eta": eta, "generator": generator}

    @torch.no_grad()
    def stochastic_encode(
        self,
        x0: Tensor,
        t: Tensor,
        use_original_steps: bool = False,
        noise=None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x0 noised to DDIM step index t (to timestep t with use_original_steps)."""
        alphas = self.model.alphas_cumprod if use_original_steps else self.ddim_alphas
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return stochastic_encode(x0, t, alphas, noise)

    @torch.no_grad()
    def decode(
        self,
        x_latent: Tensor,
        cond,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        use_original_steps: bool = False,
        callback=None,
        generator: torch.Generator | None = None,
        guidance_rescale: float = 0.0,
    ) -> Tensor:
        """img2img: the t_start lowest steps from x_latent, with make_schedule's eta.

        As the original, x_latent from stochastic_encode(t_start) sits one DDIM step above the
        first step taken here, timesteps[-t_start].
        """
        timesteps = self.timesteps[len(self.timesteps) - t_start :]
        if use_original_steps:  # every training timestep below t_start, ending at alpha = 1
            timesteps = torch.arange(t_start - 1, -1, -1, device=x_latent.device)
        final_alpha = 1.0 if use_original_steps else None
        eps_fn = cfg_eps_fn(
            self.model,
            cond,
            unconditional_conditioning,
            unconditional_guidance_scale,
            guidance_rescale,
        )
        x, _ = original_sample(
            sample_ddim,
            self.model,
            timesteps,
            x_latent,
            eps_fn,
            callback=callback,
            verbose=False,
            eta=self.ddim_eta,
            final_alpha=final_alpha,
            generator=generator,
        )
        return x
