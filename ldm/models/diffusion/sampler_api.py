"""The CompVis sampler API (`make_schedule`, `sample`) as the base of the DDIM, PLMS, DPM adapters.

An adapter names its sampler function (`sample_ddim`, ...) and the keyword arguments it takes;
this base builds the eps_fn once (`cfg_eps_fn`), the timesteps on the model's own spacing
(`model_timesteps`) and the original's intermediates and callbacks. No math lives here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.models.diffusion.guidance import EpsFn, cfg_eps_fn
from ldm.models.diffusion.schedule import alphas_along, make_ddim_timesteps
from ldm.util import reject_unsupported

# The original samplers' options and defaults: other values, or unknown options, are refused
# by name rather than ignored.
ORIGINAL_DEFAULTS = dict(
    quantize_x0=False,
    mask=None,
    x0=None,
    temperature=1.0,
    noise_dropout=0.0,
    eta=0.0,
    score_corrector=None,
    corrector_kwargs=None,
    normals_sequence=None,
    dynamic_threshold=None,
    ucg_schedule=None,
    log_every_t=100,
)
COMPAT_PARAMS = {
    "schedule": "stored by the original and never read",
    "device": "SD 2.x scripts pass it; we sample on the model's and x_T's device",
    "verbose": "make_schedule's: the original printed the schedule; we print nothing",
}
# A model without a `timestep_spacing` samples on the original's grid.
DEFAULT_SPACING = "uniform"


def model_timesteps(model, steps: int, spacing: str | None = None) -> Tensor:
    """(S,) descending timesteps on `spacing`, by default the model's own `timestep_spacing`.

    That is "uniform" (the original's) for SD and "trailing" for zero-terminal-SNR models.
    """
    spacing = spacing or getattr(model, "timestep_spacing", DEFAULT_SPACING)
    return make_ddim_timesteps(steps, model.num_timesteps, spacing)


def reject_original_options(where: str, **options) -> None:
    """Raise NotImplementedError naming each option given other than its original default
    (ORIGINAL_DEFAULTS), and each option the original samplers do not have."""
    unknown = sorted(set(options) - set(ORIGINAL_DEFAULTS))
    if unknown:
        raise NotImplementedError(f"{where}: unknown options {unknown}")
    reject_unsupported(where, {k: (v, ORIGINAL_DEFAULTS[k]) for k, v in options.items()})


def start_noise(x_T: Tensor | None, shape, device, generator=None) -> Tensor:
    """x_T, or standard normal noise of `shape` on the model's `device` when it is None."""
    return torch.randn(shape, generator=generator, device=device) if x_T is None else x_T


def original_sample(
    sample_fn: Callable,
    model,
    timesteps: Tensor,
    x: Tensor,
    eps_fn: EpsFn,
    *,
    callback=None,
    img_callback=None,
    log_every_t: int = 100,
    verbose: bool = True,
    **kwargs,
) -> tuple[Tensor, dict]:
    """Run `sample_fn` with `eps_fn` from x behind the original API: callbacks, intermediates.

    Returns (samples, {"x_inter": [...], "pred_x0": [...]}) with intermediates logged every
    log_every_t steps and at the first, as the original.
    """
    intermediates = {"x_inter": [x], "pred_x0": [x]}

    def on_step(info: dict) -> None:
        i = info["i"]
        if (len(timesteps) - i - 1) % log_every_t == 0 or i == 0:
            intermediates["x_inter"].append(info["x"])
            intermediates["pred_x0"].append(info["x0"])
        if callback is not None:
            callback(i)
        if img_callback is not None:
            img_callback(info["x0"], i)

    ac = model.alphas_cumprod
    x = sample_fn(eps_fn, x, timesteps, ac, callback=on_step, disable=not verbose, **kwargs)
    return x, intermediates


class OriginalSampler:
    """The CompVis sampler API (`make_schedule`, `sample`) over a sampler function `sample_fn`.

    Subclasses name the function and the keyword arguments it takes besides the shared ones.
    `timestep_spacing` overrides the model's own (see `model_timesteps`).
    """

    sample_fn: Callable

    def __init__(self, model, schedule: str = "linear", device=None, timestep_spacing=None):
        self.model, self.timestep_spacing = model, timestep_spacing

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str | None = None,
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """Pick the timesteps; the `ddim_*` arrays are ascending, as in the original.

        ddim_discretize defaults to the sampler's `timestep_spacing`, else the model's.
        """
        spacing = ddim_discretize or self.timestep_spacing
        self.timesteps = model_timesteps(self.model, ddim_num_steps, spacing)  # (S,) descending
        self.ddim_timesteps, self.ddim_eta = self.timesteps.flip(0).numpy(), ddim_eta
        a_t, a_prev = alphas_along(self.timesteps, self.model.alphas_cumprod)
        self.ddim_alphas, self.ddim_alphas_prev = a_t.flip(0), a_prev.flip(0)
        self.ddim_sigmas = torch.zeros_like(self.ddim_alphas)  # deterministic; DDIM's has eta

    def sample_fn_kwargs(self, eta: float, generator: torch.Generator | None) -> dict:
        """What `sample_fn` takes beyond the shared arguments."""
        return {}

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape,
        conditioning=None,
        callback=None,
        img_callback=None,
        eta: float = 0.0,
        verbose: bool = True,
        x_T=None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        generator: torch.Generator | None = None,
        guidance_rescale: float = 0.0,
        **kwargs,
    ) -> tuple[Tensor, dict]:
        """(samples (B, *shape), {"x_inter": [...], "pred_x0": [...]}) from x_T or fresh noise.

        guidance_rescale is Lin et al.'s phi (0.7 in the paper; 0: plain guidance).
        The original's other options (mask, x0, quantize_x0, temperature, noise_dropout,
        score_corrector, ...) are accepted at their defaults only.
        """
        reject_original_options(f"{type(self).__name__}.sample", **kwargs)
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        eps_fn = cfg_eps_fn(
            self.model,
            conditioning,
            unconditional_conditioning,
            unconditional_guidance_scale,
            guidance_rescale,
        )
        x = start_noise(x_T, (batch_size, *shape), self.model.device, generator)
        return original_sample(
            type(self).sample_fn,
            self.model,
            self.timesteps,
            x,
            eps_fn,
            callback=callback,
            img_callback=img_callback,
            log_every_t=log_every_t,
            verbose=verbose,
            **self.sample_fn_kwargs(eta, generator),
        )
