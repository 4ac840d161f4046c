"""The SD autoencoder's training loss: L1 + LPIPS reconstruction, KL, and a PatchGAN term.

Esser et al. 2021 (VQGAN: adaptive discriminator weight, delayed start); Rombach et al. 2022,
appendix G (the KL-regularised autoencoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.lpips import LPIPS

# Bounds of the adaptive generator weight (Esser et al. 2021, eq. 7).
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator (Goodfellow et al. 2014)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss, g_loss, last_layer: torch.Tensor, scale: float) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction one at the decoder's last layer."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grads.norm() / (g_grads.norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach() * scale


class LPIPSWithDiscriminator(nn.Module):
    """`forward(..., optimizer_idx=0)` is the autoencoder's loss, `optimizer_idx=1` the critic's.

    Args:
        disc_start: global step from which the GAN terms count.
        lpips_vgg_path / lpips_lin_path: local LPIPS weight files, needed when
            perceptual_weight > 0 (see `ldm.modules.losses.lpips`).
        disc_ndf: width of the discriminator's first layer (64 in the original).
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        lpips_vgg_path: str | None = None,
        lpips_lin_path: str | None = None,
        disc_ndf: int = 64,
    ):
        super().__init__()
        if use_actnorm or disc_conditional:
            raise NotImplementedError(
                "LPIPSWithDiscriminator: use_actnorm and disc_conditional are not supported"
            )
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss {disc_loss!r}; expected one of {sorted(D_LOSSES)}")
        self.kl_weight, self.pixel_weight = kl_weight, pixelloss_weight
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0:
            self.perceptual_loss = LPIPS(lpips_vgg_path, lpips_lin_path)
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)
        self.discriminator_iter_start = disc_start
        self.disc_loss = D_LOSSES[disc_loss]
        self.disc_factor, self.discriminator_weight = disc_factor, disc_weight

    def gan_factor(self, global_step: int) -> float:
        """disc_factor once the discriminator has started, else 0."""
        return self.disc_factor if global_step >= self.discriminator_iter_start else 0.0

    def reconstruction_nll(self, inputs, reconstructions) -> torch.Tensor:
        """Per-pixel L1 (+ LPIPS) as a Laplace negative log-likelihood with learned scale."""
        rec_loss = self.pixel_weight * (inputs - reconstructions).abs()
        if self.perceptual_weight > 0:
            rec_loss = rec_loss + self.perceptual_weight * self.perceptual_loss(
                inputs, reconstructions
            )
        return rec_loss / self.logvar.exp() + self.logvar  # (B, C, H, W)

    def forward(
        self,
        inputs,
        reconstructions,
        posteriors,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond=None,
        split: str = "train",
        weights=None,
    ) -> tuple[torch.Tensor, dict]:
        if cond is not None:
            raise NotImplementedError("LPIPSWithDiscriminator: conditional critics not supported")
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        factor = self.gan_factor(global_step)
        if optimizer_idx == 1:
            if factor == 0:  # the critic has not started: its loss is 0, so it is not run
                return torch.zeros((), device=inputs.device), {
                    f"{split}/disc_loss": torch.zeros(())
                }
            logits_real = self.discriminator(inputs.detach())
            logits_fake = self.discriminator(reconstructions.detach())
            d_loss = factor * self.disc_loss(logits_real, logits_fake)
            return d_loss, {
                f"{split}/disc_loss": d_loss.detach(),
                f"{split}/logits_real": logits_real.detach().mean(),
                f"{split}/logits_fake": logits_fake.detach().mean(),
            }
        nll = self.reconstruction_nll(inputs, reconstructions)
        weighted = nll if weights is None else weights * nll
        batch = inputs.shape[0]
        nll_loss, weighted_nll_loss = nll.sum() / batch, weighted.sum() / batch
        kl_loss = posteriors.kl().sum() / batch
        g_loss, d_weight = torch.zeros((), device=inputs.device), torch.zeros(())
        if factor > 0:
            g_loss = -self.discriminator(reconstructions).mean()
            if torch.is_grad_enabled() and last_layer is not None:
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * factor * g_loss
        return loss, {
            f"{split}/total_loss": loss.detach(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": (inputs - reconstructions).abs().mean().detach(),
            f"{split}/d_weight": d_weight,
            f"{split}/disc_factor": torch.tensor(factor),
            f"{split}/g_loss": g_loss.detach(),
        }
