"""generative-models' discretizations: the noise levels sigma of a discrete DDPM schedule.

A DDPM timestep t with cumulative alpha a_t is the noise level sigma_t = sqrt((1 - a_t) / a_t)
of x = x0 + sigma * eps (Karras et al. 2022, "Elucidating the Design Space", sec. 2), so one
schedule (`ldm.models.diffusion.schedule`) serves both forms.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm.models.diffusion import schedule


def roughly_equally_spaced_steps(num_substeps: int, max_step: int) -> np.ndarray:
    """`num_substeps` timesteps from 0 to max_step - 1, ascending, as generative-models picks
    a sampling grid: linspace(max_step - 1, 0) without the endpoint, truncated, reversed."""
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1].copy()


def sigmas_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise levels sigma_t = sqrt((1 - a_t) / a_t) of cumulative alphas (T,)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


class Discretization:
    """`__call__(n)`: n noise levels, descending, with a trailing 0 unless do_append_zero is
    false; ascending with flip."""

    def __call__(self, n: int, do_append_zero: bool = True, device=None, flip: bool = False):
        with torch.device("cpu"):
            sigmas = self.get_sigmas(n, device=device)
        if do_append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return sigmas.flip(0) if flip else sigmas

    def get_sigmas(self, n: int, device=None) -> torch.Tensor:
        raise NotImplementedError


class LegacyDDPMDiscretization(Discretization):
    """The noise levels of SD's schedule (`beta_schedule: linear`, the square of a linspace of
    sqrt(betas)), as SDXL trains and samples with."""

    def __init__(
        self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000
    ):
        self.linear_start, self.linear_end = linear_start, linear_end
        self.num_timesteps = num_timesteps
        with torch.device("cpu"):  # constants of the config, also when a model is built on meta
            betas = schedule.make_beta_schedule("linear", num_timesteps, linear_start, linear_end)
            self.alphas_cumprod = schedule.schedule_buffers(betas)["alphas_cumprod"]  # (T,) f64

    def schedule_params(self) -> dict:
        """This schedule as DDPM's params."""
        return {
            "timesteps": self.num_timesteps,
            "beta_schedule": "linear",
            "linear_start": self.linear_start,
            "linear_end": self.linear_end,
        }

    def get_sigmas(self, n: int, device=None) -> torch.Tensor:
        """n noise levels, descending: all T, or those of the sampling grid for n < T."""
        if not 1 <= n <= self.num_timesteps:
            raise ValueError(
                f"LegacyDDPMDiscretization: {n} noise levels asked of a {self.num_timesteps}-step "
                "schedule"
            )
        alphas = self.alphas_cumprod
        if n < self.num_timesteps:
            alphas = alphas[torch.from_numpy(roughly_equally_spaced_steps(n, self.num_timesteps))]
        sigmas = sigmas_of(alphas).float()
        return (sigmas if device is None else sigmas.to(device)).flip(0)
