"""DPM-Solver++(2M) over SD's discrete timesteps, and the SD 2.x `DPMSolverSampler` adapter.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models" (https://arxiv.org/abs/2211.01095), Alg. 2, in data-prediction (x0) form with
alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t) and lambda_t = log(alpha_t / sigma_t).

It matches diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2, solver_type="midpoint", lower_order_final=True)` step for step: first-order at
the first step, and at the last one when there are fewer than 15 steps or it lands on a = 1
(diffusers' final_sigmas_type="zero", our final_alpha=1.0).

The adapter samples on the model's `timestep_spacing`, as DDIMSampler and PLMSSampler do
("uniform" for SD, "trailing" for zero-terminal-SNR models), where the SD 2.x original always
took "linspace" timesteps from 999: pass `DPMSolverSampler(model, timestep_spacing="linspace")`
for that grid (diffusers' DPMSolverMultistepScheduler default, which the tests compare against).
It ends at alphas_cumprod[0] (the original's t = 1/N, diffusers' final_sigmas_type="sigma_min");
unlike the original it rounds timesteps to integers and, between 10 and 14 steps, ends
first-order (the original does so below 10 steps only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.models.diffusion import schedule
from ldm.models.diffusion.guidance import EpsFn
from ldm.models.diffusion.sampler_api import OriginalSampler, reject_original_options

# diffusers' lower_order_final: with fewer steps than this the last step is first-order.
LOWER_ORDER_FINAL_BELOW = 15


def half_log_snr(a: Tensor) -> Tensor:
    """lambda = log(sqrt(a) / sqrt(1 - a)); +inf at a = 1."""
    return 0.5 * (a.log() - (1 - a).log())


def dpmpp_2m_step(
    x: Tensor,
    x0: Tensor,
    a: Tensor,
    a_next: Tensor,
    x0_prev: Tensor | None = None,
    a_prev: Tensor | None = None,
) -> Tensor:
    """x at a_next by DPM-Solver++(2M) (Lu et al. 2022, Alg. 2); first-order without x0_prev."""
    # First-order DPM-Solver++ is DDIM; x0_prev is the previous step's x0, predicted at a_prev.
    h = half_log_snr(a_next) - half_log_snr(a)
    denoised = x0
    if x0_prev is not None:  # D = (1 + 1 / 2r) x0 - (1 / 2r) x0_prev, r = h_prev / h
        r = (half_log_snr(a) - half_log_snr(a_prev)) / h
        denoised = x0 + (x0 - x0_prev) / (2 * r)
    return ((1 - a_next) / (1 - a)).sqrt() * x - a_next.sqrt() * torch.expm1(-h) * denoised


def sample_dpmpp_2m(
    eps_fn: EpsFn,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    final_alpha: float | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) from x at timesteps[0] down `timesteps` to final_alpha (default a[0])."""
    a, a_next = schedule.alphas_along(timesteps, alphas_cumprod, final_alpha)
    n, x0_prev = len(timesteps), None
    for i, t in enumerate(tqdm(timesteps.tolist(), disable=disable)):
        t_batch = x.new_full(x.shape[:1], t, dtype=torch.long)  # (B,)
        x0 = schedule.x0_from_eps(x, t_batch, eps_fn(x, t_batch), alphas_cumprod)
        last_first_order = i == n - 1 and (n < LOWER_ORDER_FINAL_BELOW or a_next[i] == 1)
        if i == 0 or last_first_order:
            x = dpmpp_2m_step(x, x0, a[i], a_next[i])
        else:
            x = dpmpp_2m_step(x, x0, a[i], a_next[i], x0_prev, a[i - 1])
        x0_prev = x0
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


class DPMSolverSampler(OriginalSampler):
    """The SD 2.x `DPMSolverSampler` API over `sample_dpmpp_2m` (no math here)."""

    sample_fn = staticmethod(sample_dpmpp_2m)

    def __init__(self, model, device=None, timestep_spacing: str | None = None, **kwargs):
        reject_original_options("DPMSolverSampler", **kwargs)
        super().__init__(model, device=device, timestep_spacing=timestep_spacing)

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str | None = None,
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """The base's timesteps; DPM-Solver++ is deterministic, so eta is refused by name."""
        reject_original_options("DPMSolverSampler.sample", eta=ddim_eta)
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning=None, **kwargs):
        """(samples (B, *shape), None), as the original; other options at their defaults only."""
        x, _ = super().sample(S, batch_size, shape, conditioning, **kwargs)
        return x, None
