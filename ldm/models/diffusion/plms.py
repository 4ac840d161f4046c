"""PLMS sampling, and the original `PLMSSampler` API as an adapter.

Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (PNDM,
https://arxiv.org/abs/2202.09778): the DDIM transfer (their eq. 9, our `ddim_step` with eta = 0)
driven by a linear-multistep combination of past eps. As the original SD PLMSSampler, the first
step is a pseudo improved Euler step (a second model call) and later steps use Adams-Bashforth
of order 2, 3, then 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import ddim_step
from ldm.models.diffusion.guidance import EpsFn
from ldm.models.diffusion.sampler_api import OriginalSampler
from ldm.models.diffusion.schedule import alphas_along

# Adams-Bashforth (numerators newest first, denominator) by the number of past eps used.
ADAMS_BASHFORTH = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}


def plms_eps(eps: Tensor, old_eps: Sequence[Tensor], eps_next: Tensor | None = None) -> Tensor:
    """eps' for PLMS: (eps + eps_next) / 2 at the first step, else Adams-Bashforth over old_eps."""
    if not old_eps:
        return (eps + eps_next) / 2
    numerators, denominator = ADAMS_BASHFORTH[len(old_eps)]
    history = [eps, *reversed(old_eps)]  # newest first
    return sum(n * e for n, e in zip(numerators, history, strict=True)) / denominator


def plms_step(
    x_t: Tensor,
    eps: Tensor,
    old_eps: Sequence[Tensor],
    a_t: Tensor,
    a_prev: Tensor,
    eps_next: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One PLMS step to a_prev (Liu et al. 2022, eq. 9 with the multistep eps'); (x_prev, x0)."""
    return ddim_step(x_t, plms_eps(eps, old_eps, eps_next), a_t, a_prev, 0.0)


def sample_plms(
    eps_fn: EpsFn,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    final_alpha: float | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
) -> Tensor:
    """PLMS from x at timesteps[0] down `timesteps`; deterministic, so it takes no generator."""
    a_t, a_prev = alphas_along(timesteps, alphas_cumprod, final_alpha)
    ts, old_eps = timesteps.tolist(), []
    for i, t in enumerate(tqdm(ts, disable=disable)):
        eps, eps_next = eps_fn(x, x.new_full(x.shape[:1], t, dtype=torch.long)), None
        if not old_eps:  # pseudo improved Euler: eps at the Euler point of the next timestep
            x_euler, _ = ddim_step(x, eps, a_t[i], a_prev[i], 0.0)
            t_next = ts[min(i + 1, len(ts) - 1)]
            eps_next = eps_fn(x_euler, x.new_full(x.shape[:1], t_next, dtype=torch.long))
        x, x0 = plms_step(x, eps, old_eps, a_t[i], a_prev[i], eps_next)
        old_eps = [*old_eps[-2:], eps]
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


class PLMSSampler(OriginalSampler):
    """The original CompVis `PLMSSampler` API over `sample_plms` (no math here)."""

    sample_fn = staticmethod(sample_plms)

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str | None = None,
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """Pick the timesteps as DDIM does; PLMS is deterministic, so eta must be 0."""
        if ddim_eta != 0:
            raise ValueError(f"PLMSSampler: ddim_eta must be 0 for PLMS, got {ddim_eta}")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)
