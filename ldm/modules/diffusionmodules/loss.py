"""generative-models' `StandardDiffusionLoss`: w(sigma) |D(x0 + sigma eps; sigma) - x0|^p.

Called as there (`loss(network, denoiser, conditioner, x0, batch)`, per item) it computes that
formula. DiffusionEngine instead trains with DDPM's `DiffusionLoss` at the same noise levels:
for a DiscreteDenoiser, D - x0 = -s(sigma) (F - target) with target eps (s = sigma) or v
(s = sigma / sqrt(1 + sigma^2)), so the two losses agree when each timestep weighs
w(sigma) s(sigma)^p, which `timestep_weights` gives (all ones for SDXL's eps weighting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ldm.models.diffusion.schedule import append_dims
from ldm.util import instantiate_from_config, reject_unsupported

LOSS_POWERS = {"l2": 2, "l1": 1}


def prediction_scale(parameterization: str, sigma: torch.Tensor) -> torch.Tensor:
    """s(sigma) with |D - x0| = s |F - target| for a network F predicting eps or v."""
    if parameterization == "eps":
        return sigma
    return sigma / (1 + sigma**2).sqrt()


class StandardDiffusionLoss(nn.Module):
    """`loss_type` (or the first configs' `type`): "l2" or "l1"; the noise gets an offset per
    item and channel of `offset_noise_level` (Guttenberg 2023), as generative-models' later
    code draws it; `loss_weighting_config` (or the denoiser's `weighting_config`) gives w."""

    def __init__(
        self,
        sigma_sampler_config: Mapping,
        loss_weighting_config: Mapping | None = None,
        loss_type: str = "l2",
        offset_noise_level: float = 0.0,
        batch2model_keys: str | Sequence[str] | None = None,
        type: str | None = None,  # noqa: A002  (the first configs' name of loss_type)
    ):
        super().__init__()
        if type is not None and loss_type not in ("l2", type):
            raise ValueError(
                f"StandardDiffusionLoss: type={type!r} and loss_type={loss_type!r} name the "
                "same option; give one"
            )
        self.loss_type = type or loss_type
        reject_unsupported(
            "StandardDiffusionLoss", {"loss_type": (self.loss_type, frozenset(LOSS_POWERS))}
        )
        self.sigma_sampler = instantiate_from_config(sigma_sampler_config)
        self.loss_weighting = (
            None
            if loss_weighting_config is None
            else instantiate_from_config(loss_weighting_config)
        )
        self.offset_noise_level = offset_noise_level
        keys = [batch2model_keys] if isinstance(batch2model_keys, str) else batch2model_keys
        self.batch2model_keys = set(keys or [])

    def weight(self, denoiser, sigmas: torch.Tensor) -> torch.Tensor:
        return denoiser.w(sigmas) if self.loss_weighting is None else self.loss_weighting(sigmas)

    def forward(
        self, network: Callable, denoiser, conditioner: Callable, x0: torch.Tensor, batch: Mapping
    ) -> torch.Tensor:
        """(B,) losses of clean latents x0 (B, C, H, W) at randomly drawn noise levels."""
        cond = conditioner(batch)
        inputs = {key: batch[key] for key in self.batch2model_keys.intersection(batch)}
        sigmas = self.sigma_sampler(x0.shape[0]).to(x0)  # (B,)
        noise = torch.randn_like(x0)
        if self.offset_noise_level > 0.0:
            offset = torch.randn(x0.shape[:2], device=x0.device, dtype=x0.dtype)  # (B, C)
            noise = noise + self.offset_noise_level * append_dims(offset, x0.ndim)
        noised = x0 + noise * append_dims(sigmas, x0.ndim)
        denoised = denoiser(network, noised, sigmas, cond, **inputs)
        w = append_dims(self.weight(denoiser, sigmas), x0.ndim)
        error = (denoised - x0).abs() ** LOSS_POWERS[self.loss_type]
        return (w * error).flatten(1).mean(dim=1)

    def ddpm_params(self, denoiser) -> dict:
        """DDPM's loss params for training `denoiser` (a DiscreteDenoiser, see its ddpm_params)
        as this loss does: its noise levels, error and per-timestep weights."""
        where = "StandardDiffusionLoss (loss_fn_config)"
        reject_unsupported(where, {"batch2model_keys": (sorted(self.batch2model_keys), [])})
        sampler = self.sigma_sampler
        if not isinstance(getattr(sampler, "sigmas", None), torch.Tensor) or not (
            sampler.sigmas.shape == denoiser.sigmas.shape
            and torch.allclose(sampler.sigmas, denoiser.sigmas.to(sampler.sigmas))
        ):
            raise NotImplementedError(
                f"{where}: DiffusionEngine draws DDPM's timesteps uniformly, so the "
                "sigma_sampler must be a DiscreteSampling over the denoiser's discretization and "
                "num_idx"
            )
        parameterization = denoiser.scaling.parameterization
        sigmas = denoiser.sigmas.double()  # (T,) ascending: sigmas[t] is timestep t's
        scale = prediction_scale(parameterization, sigmas) ** LOSS_POWERS[self.loss_type]
        weights = (self.weight(denoiser, sigmas) * scale).float()  # (T,)
        ones = torch.allclose(weights, torch.ones_like(weights), rtol=1e-4)
        return {
            "loss_type": self.loss_type,
            "offset_noise_strength": self.offset_noise_level,
            "timestep_weights": None if ones else weights,
        }
