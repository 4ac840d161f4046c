"""The diffusion training loss as a plain object, handed the network when it is called.

In the spirit of guided-diffusion's `training_losses(model, x_start, t)`: `DiffusionLoss` is
built from the schedule and the loss options alone, so a test can build and call it without a
LightningModule, a first stage or a text encoder. Ho et al. 2020 (the simple loss, eq. 14, and
the bound's weights, eq. 12); Hang et al. 2023 (Min-SNR-gamma); Chen et al. 2022
(self-conditioning).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.models.diffusion import schedule
from ldm.models.diffusion.noise import training_noise

LOSSES = {"l2": F.mse_loss, "l1": F.l1_loss}
# Self-conditioning trains with the model's own x0 estimate on this fraction of batches.
SELF_CONDITIONING_P = 0.5

# (x_t (B, C, H, W), t (B,), self_cond (B, C, H, W) or None) -> the network's prediction
Predict = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class DiffusionLoss:
    """`loss(predict, x0, t)`: the weighted error of the network's prediction at (x_t, t).

    Args:
        betas: (T,) float64 betas of the schedule.
        parameterization: what the network predicts, eps, x0 or v.
        loss_type: "l2" or "l1", per element.
        min_snr_gamma: Min-SNR-gamma weights per timestep; None weighs each timestep 1.
        l_simple_weight, original_elbo_weight: weights of the simple loss and the bound's.
        self_conditioning: feed a first pass's detached x0 estimate on half the batches.
        offset_noise_strength, immiscible: how the training noise is drawn (`noise.py`).
    """

    def __init__(
        self,
        betas: Tensor,
        parameterization: str = "eps",
        loss_type: str = "l2",
        min_snr_gamma: float | None = None,
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
        self_conditioning: bool = False,
        offset_noise_strength: float = 0.0,
        immiscible: bool = False,
    ):
        if parameterization not in schedule.PARAMETERIZATIONS:
            expected = schedule.PARAMETERIZATIONS
            raise ValueError(f"parameterization {parameterization!r}; expected one of {expected}")
        if loss_type not in LOSSES:
            raise ValueError(f"loss_type {loss_type!r}; expected one of {sorted(LOSSES)}")
        self.parameterization, self.error = parameterization, LOSSES[loss_type]
        self.l_simple_weight, self.original_elbo_weight = l_simple_weight, original_elbo_weight
        self.self_conditioning = self_conditioning
        self.offset_noise_strength, self.immiscible = offset_noise_strength, immiscible
        alphas_cumprod = schedule.schedule_buffers(betas)["alphas_cumprod"].float()
        snr_weights = torch.ones(len(betas))
        if min_snr_gamma is not None:
            snr_weights = schedule.min_snr_weights(alphas_cumprod, parameterization, min_snr_gamma)
        vlb_weights = schedule.vlb_weights(betas, parameterization)
        self.tables = {"alphas_cumprod": alphas_cumprod, "snr": snr_weights, "vlb": vlb_weights}
        self.on_device: dict[torch.device, dict[str, Tensor]] = {}

    def weigh_timesteps(self, weights: Tensor) -> None:
        """Multiply each timestep's loss weight by `weights` (T,), e.g. a generative-models
        loss weighting (`ldm.modules.diffusionmodules.loss`)."""
        if weights.shape != self.tables["snr"].shape:
            raise ValueError(
                f"DiffusionLoss: timestep weights of shape {tuple(weights.shape)} for a "
                f"{len(self.tables['snr'])}-step schedule"
            )
        self.tables["snr"] = self.tables["snr"] * weights.float()
        self.on_device.clear()

    def table(self, name: str, device: torch.device) -> Tensor:
        """One of the (T,) tables on `device`, copied there once."""
        if device not in self.on_device:
            self.on_device[device] = {k: v.to(device) for k, v in self.tables.items()}
        return self.on_device[device][name]

    def __call__(
        self,
        predict: Predict,
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        logvar: Tensor | None = None,
        training: bool = True,
        prefix: str = "train",
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, values to log) for clean x0 (B, C, ...) at timesteps t (B,).

        `logvar` (T,) is the learned or fixed log-variance per timestep (zeros when None);
        `weights` (B,) weigh each item's loss before the batch mean, as kohya's loss weights
        (DreamBooth's prior preservation: the class images' items at prior_loss_weight);
        `mask` (B, 1, H, W) in [0, 1] weighs each position (area-resized to x0's grid, so a
        pixel mask weighs latents): each item's loss is its error's mean over the mask.
        """
        ac = self.table("alphas_cumprod", t.device)
        if noise is None:
            noise = training_noise(x0, self.offset_noise_strength, self.immiscible)
        x_t = schedule.q_sample(x0, t, noise, ac)  # (B, C, ...)
        self_cond = None
        if self.self_conditioning and training and torch.rand(()) < SELF_CONDITIONING_P:
            with torch.no_grad():  # a first pass's x0 estimate, as a detached extra input
                first = predict(x_t, t, None)
                self_cond = schedule.x0_from_prediction(self.parameterization, x_t, t, first, ac)
        prediction = predict(x_t, t, self_cond)  # (B, C, ...)
        target = schedule.training_target(self.parameterization, x0, t, noise, ac)  # eps, x0, v
        loss_simple = masked_mean(self.error(prediction, target, reduction="none"), mask)  # (B,)
        logvar_t = torch.zeros_like(loss_simple) if logvar is None else logvar[t]  # (B,)
        items = torch.ones_like(loss_simple) if weights is None else weights.to(loss_simple)
        weighted = self.table("snr", t.device)[t] * loss_simple  # Min-SNR-gamma, or 1
        loss = self.l_simple_weight * (items * (weighted / logvar_t.exp() + logvar_t)).mean()
        loss_vlb = (items * self.table("vlb", t.device)[t] * loss_simple).mean()
        loss = loss + self.original_elbo_weight * loss_vlb
        logs = {
            f"{prefix}/loss_simple": loss_simple.mean(),
            f"{prefix}/loss_vlb": loss_vlb,
            f"{prefix}/loss": loss,
        }
        return loss, logs


def masked_mean(error: Tensor, mask: Tensor | None) -> Tensor:
    """Per-item mean of `error` (B, C, H, W) weighted by `mask` (B, 1, H', W'), resized by area
    averaging to (H, W); an item whose mask is all zero gets 0."""
    dims = tuple(range(1, error.ndim))
    if mask is None:
        return error.mean(dim=dims)  # (B,)
    if mask.shape[2:] != error.shape[2:]:
        mask = F.interpolate(mask.to(error), size=error.shape[2:], mode="area")
    mask = mask.to(error).expand_as(error)  # (B, C, H, W)
    return (error * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1e-8)


def check_self_conditioning_channels(unet_config: Mapping, channels: int, conditioning_key):
    """Self-conditioning doubles the UNet's input: refuse a config whose in_channels do not."""
    params = unet_config.get("params") or {}
    in_channels = params.get("in_channels")
    if conditioning_key in ("concat", "hybrid") or in_channels is None:
        return
    if in_channels != 2 * channels:
        raise ValueError(
            f"self_conditioning feeds the x0 estimate as {channels} extra input channels: "
            f"unet_config.params.in_channels must be {2 * channels}, got {in_channels}"
        )
