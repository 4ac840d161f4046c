"""The diagonal Gaussian posterior of the KL autoencoder (Kingma & Welling 2014)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Clamp of the log-variance, as the original, so exp() stays finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) from `parameters` (B, 2C, H, W) = [mean | logvar] along channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, C, H, W) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:  # a point mass at the mean; logvar is kept as given, as the original
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = (0.5 * self.logvar).exp()
            self.var = self.logvar.exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised sample mean + std * N(0, 1)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, H, W); other defaults to N(0, I)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        if other is None:
            kl = self.mean.square() + self.var - 1.0 - self.logvar
        else:
            kl = (self.mean - other.mean).square() / other.var
            kl = kl + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * kl.sum(dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return sample.new_zeros(sample.shape[0])
        log_two_pi = math.log(2.0 * math.pi)
        terms = log_two_pi + self.logvar + (sample - self.mean).square() / self.var
        return 0.5 * terms.sum(dim=tuple(dims))
