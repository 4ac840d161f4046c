"""A stand-in for LatentDiffusion that the sampler tests share: toy_eps + a conditioning bias,
as an eps, x0 or v prediction on SD's schedule, counting its calls."""

from __future__ import annotations

import torch

from ldm.models.diffusion import schedule

T = 1000
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
W = torch.tensor([0.9, -0.7, 1.3, 0.5]).view(1, 4, 1, 1)  # per-channel weights of the toy model


def sd_betas() -> torch.Tensor:
    return schedule.make_beta_schedule("linear", T, 0.00085, 0.012)


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, nonlinear, time-dependent stand-in for a trained eps network (x0 stays O(1))."""
    return x + 0.2 * torch.tanh(x * W.to(x) + t.to(x).reshape(-1, 1, 1, 1) / T)


def cond_bias(cond) -> torch.Tensor:
    """How the fake model's output depends on the conditioning: (B, 1, 1, 1)."""
    if isinstance(cond, dict):
        return sum(cond_bias(c) for entries in cond.values() for c in entries)
    return cond.mean(dim=tuple(range(1, cond.ndim))).reshape(-1, 1, 1, 1)


class FakeModel:
    """What the samplers use of LatentDiffusion, predicting eps, x0 or v of toy_eps + cond."""

    num_timesteps, device = T, torch.device("cpu")

    def __init__(self, parameterization: str = "eps"):
        self.parameterization, self.calls = parameterization, 0
        self.alphas_cumprod = schedule.schedule_buffers(sd_betas())["alphas_cumprod"].float()

    def true_eps(self, x_t, t, cond):
        return toy_eps(x_t, t) + (0 if cond is None else cond_bias(cond))

    def apply_model(self, x_t, t, cond=None):
        self.calls += 1
        eps, a = self.true_eps(x_t, t, cond), self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()  # written out, independent of schedule.py
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        return {"eps": eps, "x0": x0, "v": v}[self.parameterization]
