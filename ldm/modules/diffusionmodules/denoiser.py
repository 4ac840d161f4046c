"""generative-models' denoisers: the network F wrapped into D(x; sigma) ~ x0 (Karras et al.
2022, eq. 7), for x = x0 + sigma eps.

`DiscreteDenoiser` snaps sigma to the schedule's T levels and hands F the timestep index, as
SDXL does; with a LegacyDDPMDiscretization and an eps or v scaling that is DDPM's model at
timestep t, and `ddpm_params` says which, so DiffusionEngine trains and samples it with DDPM's
loss and samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ldm.models.diffusion.schedule import append_dims
from ldm.util import instantiate_from_config, reject_unsupported


class Denoiser(nn.Module):
    """`forward(network, x, sigma, cond)`: c_skip x + c_out network(c_in x, c_noise, cond).

    `weighting_config` (the first SDXL configs put the loss weighting here) gives `w(sigma)`.
    """

    def __init__(self, scaling_config: Mapping, weighting_config: Mapping | None = None):
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)
        self.weighting = (
            None if weighting_config is None else instantiate_from_config(weighting_config)
        )

    def w(self, sigma: torch.Tensor) -> torch.Tensor:
        """The loss weight at sigma, from weighting_config."""
        if self.weighting is None:
            raise ValueError(
                f"{type(self).__name__}: no weighting_config; the loss's loss_weighting_config "
                "weighs it"
            )
        return self.weighting(sigma)

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return c_noise

    def forward(
        self, network: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping, **inputs
    ) -> torch.Tensor:
        sigma = self.possibly_quantize_sigma(sigma)  # (B,)
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma, x.ndim))
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma.shape))  # (B,)
        return network(x * c_in, c_noise, cond, **inputs) * c_out + x * c_skip


class DiscreteDenoiser(Denoiser):
    """A denoiser on the `num_idx` noise levels of a discretization (`sigmas`, ascending, a
    buffer of the checkpoint: `denoiser.sigmas`); the network gets the level's index."""

    def __init__(
        self,
        scaling_config: Mapping,
        num_idx: int,
        discretization_config: Mapping,
        do_append_zero: bool = False,
        quantize_c_noise: bool = True,
        flip: bool = True,
        weighting_config: Mapping | None = None,
    ):
        super().__init__(scaling_config, weighting_config)
        self.discretization = instantiate_from_config(discretization_config)
        sigmas = self.discretization(num_idx, do_append_zero=do_append_zero, flip=flip)
        self.register_buffer("sigmas", sigmas)
        self.num_idx, self.quantize_c_noise = num_idx, quantize_c_noise
        self.options = dict(do_append_zero=do_append_zero, flip=flip)

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma - self.sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def idx_to_sigma(self, idx: torch.Tensor | int) -> torch.Tensor:
        return self.sigmas[idx]

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.idx_to_sigma(self.sigma_to_idx(sigma))

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise

    def ddpm_params(self) -> dict:
        """DDPM's schedule and parameterization params of this denoiser, which must be one:
        every level of a DDPM schedule, ascending, the network fed timestep indices."""
        where = "DiscreteDenoiser (denoiser_config)"
        schedule_params = getattr(self.discretization, "schedule_params", None)
        parameterization = getattr(self.scaling, "parameterization", None)
        if schedule_params is None or parameterization is None:
            raise NotImplementedError(
                f"{where}: DiffusionEngine trains a LegacyDDPMDiscretization with EpsScaling or "
                f"VScaling; got {type(self.discretization).__name__} and "
                f"{type(self.scaling).__name__}"
            )
        params = schedule_params()
        reject_unsupported(
            where,
            {
                "num_idx": (self.num_idx, params["timesteps"]),
                "do_append_zero": (self.options["do_append_zero"], False),
                "flip": (self.options["flip"], True),
                "quantize_c_noise": (self.quantize_c_noise, True),
            },
        )
        return params | {"parameterization": parameterization}
