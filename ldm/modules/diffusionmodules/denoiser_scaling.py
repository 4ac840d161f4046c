"""generative-models' denoiser scalings: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).

With x = x0 + sigma eps, `EpsScaling` makes F predict eps (c_out = -sigma) and `VScaling` v
(Salimans & Ho 2022), on the input scaled to unit variance: the UNet sees DDPM's x_t. Each
names the `parameterization` DDPM trains that F with.
"""

from __future__ import annotations

import torch


class EpsScaling:
    """F predicts the noise eps."""

    parameterization = "eps"

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        return c_skip, c_out, c_in, sigma.clone()


class VScaling:
    """F predicts v = sqrt(a) eps - sqrt(1 - a) x0."""

    parameterization = "v"

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        return c_skip, c_out, c_in, sigma.clone()
