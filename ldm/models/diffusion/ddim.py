"""DDIM sampling over SD's discrete timesteps, and the original `DDIMSampler` API as an adapter.

Song et al. 2021, "Denoising Diffusion Implicit Models" (https://arxiv.org/abs/2010.02502).
Timesteps are passed in sampling order (descending); after the last one the sampler steps to
`final_alpha`, by default alphas_cumprod[0] as in the original (diffusers' set_alpha_to_one=False).
The glue behind the original API (`original_sample`, `reject_unsupported`) is shared with the
PLMS and DPM-Solver adapters.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.models.diffusion import schedule
from ldm.models.diffusion.guidance import EpsFn, cfg_eps_fn

SPACINGS = ("uniform", "quad", "leading", "trailing", "linspace")
# The original samplers' options and defaults: other values, or unknown options, are refused
# by name rather than ignored.
ORIGINAL_DEFAULTS = dict(
    quantize_x0=False, mask=None, x0=None, temperature=1.0, noise_dropout=0.0, eta=0.0,
    score_corrector=None, corrector_kwargs=None, normals_sequence=None, dynamic_threshold=None,
    ucg_schedule=None, log_every_t=100,
)  # fmt: skip
COMPAT_PARAMS = {
    "schedule": "stored by the original and never read",
    "device": "SD 2.x scripts pass it; we sample on the model's and x_T's device",
    "verbose": "make_schedule's: the original printed the schedule; we print nothing",
}


def make_ddim_timesteps(
    num_steps: int, num_train_timesteps: int, spacing: str = "uniform"
) -> Tensor:
    """(S,) int64 timesteps, descending: "uniform"/"quad" as the original, the rest as diffusers.

    "uniform" is the original's range(0, T, T // S) + 1, so S + 1 steps when S does not divide T,
    less t = T where the original indexed past the schedule (S = 3, 9, 27, ...);
    "leading" is diffusers' with steps_offset=1; "linspace" is the SD 2.x DPM-Solver grid.
    """
    n, s = num_train_timesteps, num_steps
    grids = {
        "uniform": lambda: np.arange(1, n, n // s),
        "quad": lambda: (np.linspace(0, np.sqrt(n * 0.8), s) ** 2).astype(np.int64) + 1,
        "leading": lambda: np.arange(s) * (n // s) + 1,
        "trailing": lambda: np.round(np.arange(n, 0, -n / s))[::-1] - 1,
        "linspace": lambda: np.linspace(0, n - 1, s + 1).round()[1:],
    }
    if spacing not in grids or not 0 < s <= n:
        raise ValueError(
            f"ddim timesteps: spacing {spacing!r}, {s} steps of {n}; "
            f"expected one of {SPACINGS} and 0 < steps <= {n}"
        )
    timesteps = grids[spacing]().astype(np.int64)
    if timesteps.max() >= n:
        raise ValueError(f"{spacing!r} spacing with {s} steps reaches t = {timesteps.max()} >= {n}")
    return torch.from_numpy(timesteps[::-1].copy())


def alphas_along(
    timesteps: Tensor, alphas_cumprod: Tensor, final_alpha: float | None = None
) -> tuple[Tensor, Tensor]:
    """(a_t, a_prev) for each step: a_prev is the next timestep's level, then the final one."""
    a_t = alphas_cumprod[timesteps.to(alphas_cumprod.device)]  # (S,)
    last = alphas_cumprod[:1] if final_alpha is None else a_t.new_tensor([final_alpha])
    return a_t, torch.cat([a_t[1:], last])  # (S,), (S,)


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
    a_t, a_prev = alphas_along(timesteps, alphas_cumprod, final_alpha)
    for i, t in enumerate(tqdm(timesteps.tolist(), disable=disable)):
        eps = eps_fn(x, x.new_full(x.shape[:1], t, dtype=torch.long))  # t: (B,)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, x0 = ddim_step(x, eps, a_t[i], a_prev[i], eta, noise)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def reject_unsupported(where: str, **options) -> None:
    """Raise NotImplementedError naming each option given other than its original default."""

    def is_default(name: str, value) -> bool:
        default = ORIGINAL_DEFAULTS.get(name, ...)
        if default is None:
            return value is None
        return not isinstance(value, torch.Tensor) and value == default

    bad = sorted(name for name, value in options.items() if not is_default(name, value))
    if bad:
        raise NotImplementedError(f"{where}: {bad} not supported (only the defaults are)")


def start_noise(x_T: Tensor | None, shape, device, generator=None) -> Tensor:
    """x_T, or standard normal noise of `shape` on the model's `device` when it is None."""
    return torch.randn(shape, generator=generator, device=device) if x_T is None else x_T


def original_sample(
    sample_fn: Callable, model, timesteps: Tensor, x: Tensor, guidance: tuple, *,
    callback=None, img_callback=None, log_every_t: int = 100, verbose: bool = True, **kwargs,
) -> tuple[Tensor, dict]:  # fmt: skip
    """Run `sample_fn` from x behind the original API: CFG, callbacks and intermediates.

    guidance is (cond, uncond, scale[, rescale]). Returns
    (samples, {"x_inter": [...], "pred_x0": [...]}) with intermediates logged every
    log_every_t steps and at the first, as the original.
    """
    eps_fn = cfg_eps_fn(model, *guidance)
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
    """

    sample_fn: Callable

    def __init__(self, model, schedule: str = "linear", device=None):
        self.model = model

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str | None = None, ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:  # fmt: skip
        """Pick the DDIM timesteps; the `ddim_*` arrays are ascending, as in the original.

        ddim_discretize defaults to the model's `timestep_spacing`: "uniform" as the original,
        "trailing" for zero-terminal-SNR models.
        """
        steps, num_train = ddim_num_steps, self.model.num_timesteps
        if ddim_discretize is None:
            ddim_discretize = getattr(self.model, "timestep_spacing", "uniform")
        self.timesteps = make_ddim_timesteps(steps, num_train, ddim_discretize)  # (S,) descending
        self.ddim_timesteps, self.ddim_eta = self.timesteps.flip(0).numpy(), ddim_eta
        a_t, a_prev = alphas_along(self.timesteps, self.model.alphas_cumprod)
        self.ddim_alphas, self.ddim_alphas_prev = a_t.flip(0), a_prev.flip(0)
        self.ddim_sigmas = ddim_sigma(self.ddim_alphas, self.ddim_alphas_prev, ddim_eta)

    def sample_fn_kwargs(self, eta: float, generator: torch.Generator | None) -> dict:
        """What `sample_fn` takes beyond the shared arguments."""
        return {}

    @torch.no_grad()
    def sample(
        self, S: int, batch_size: int, shape, conditioning=None, callback=None,
        img_callback=None, eta: float = 0.0, verbose: bool = True, x_T=None,
        log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None, generator: torch.Generator | None = None,
        guidance_rescale: float = 0.0, **kwargs,
    ) -> tuple[Tensor, dict]:  # fmt: skip
        """(samples (B, *shape), {"x_inter": [...], "pred_x0": [...]}) from x_T or fresh noise.

        guidance_rescale is Lin et al.'s phi (0.7 in the paper; 0: plain guidance).
        The original's other options (mask, x0, quantize_x0, temperature, noise_dropout,
        score_corrector, ...) are accepted at their defaults only.
        """
        reject_unsupported(f"{type(self).__name__}.sample", **kwargs)
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        guidance = (
            conditioning, unconditional_conditioning, unconditional_guidance_scale,
            guidance_rescale,
        )  # fmt: skip
        x = start_noise(x_T, (batch_size, *shape), self.model.device, generator)
        return original_sample(
            type(self).sample_fn, self.model, self.timesteps, x, guidance, callback=callback,
            img_callback=img_callback, log_every_t=log_every_t, verbose=verbose,
            **self.sample_fn_kwargs(eta, generator),
        )  # fmt: skip


class DDIMSampler(OriginalSampler):
    """The original CompVis `DDIMSampler` API over `sample_ddim` (no math here)."""

    sample_fn = staticmethod(sample_ddim)

    def sample_fn_kwargs(self, eta: float, generator: torch.Generator | None) -> dict:
        return {"eta": eta, "generator": generator}

    @torch.no_grad()
    def stochastic_encode(
        self, x0: Tensor, t: Tensor, use_original_steps: bool = False, noise=None,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """x0 noised to DDIM step index t (to timestep t with use_original_steps)."""
        alphas = self.model.alphas_cumprod if use_original_steps else self.ddim_alphas
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return stochastic_encode(x0, t, alphas, noise)

    @torch.no_grad()
    def decode(
        self, x_latent: Tensor, cond, t_start: int, unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None, use_original_steps: bool = False, callback=None,
        generator: torch.Generator | None = None, guidance_rescale: float = 0.0,
    ) -> Tensor:  # fmt: skip
        """img2img: the t_start lowest steps from x_latent, with make_schedule's eta.

        As the original, x_latent from stochastic_encode(t_start) sits one DDIM step above the
        first step taken here, timesteps[-t_start].
        """
        timesteps = self.timesteps[len(self.timesteps) - t_start :]
        if use_original_steps:  # every training timestep below t_start, ending at alpha = 1
            timesteps = torch.arange(t_start - 1, -1, -1, device=x_latent.device)
        final_alpha = 1.0 if use_original_steps else None
        guidance = (
            cond,
            unconditional_conditioning,
            unconditional_guidance_scale,
            guidance_rescale,
        )
        x, _ = original_sample(
            sample_ddim, self.model, timesteps, x_latent, guidance, callback=callback,
            verbose=False, eta=self.ddim_eta, final_alpha=final_alpha, generator=generator,
        )  # fmt: skip
        return x
