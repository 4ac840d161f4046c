"""How training draws its noise: plain Gaussian, offset noise, and immiscible pairing.

Offset noise: Guttenberg 2023, "Diffusion with Offset Noise" (a per-channel constant added to
the noise, so the model learns to change an image's mean brightness and colour).
Immiscible diffusion: Li et al. 2024, "Immiscible Diffusion: Accelerating Diffusion Training
with Noise Assignment" (each image gets the batch's noise sample nearest to it, by a
minimum-cost assignment, so noise-image pairs stop crossing each other).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def offset_noise(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """N(0, 1) noise shaped like x0 (B, C, ...) plus strength · N(0, 1) per sample and channel."""
    noise = torch.randn_like(x0)
    if strength:
        offset_shape = (*x0.shape[:2], *(1,) * (x0.ndim - 2))  # (B, C, 1, ...)
        noise = noise + strength * torch.randn(offset_shape, device=x0.device, dtype=x0.dtype)
    return noise


def immiscible_order(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B,) indices: noise[order[i]] goes with x0[i], minimising the total L2 distance."""
    distances = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float())  # (B, B)
    rows, cols = linear_sum_assignment(distances.cpu().numpy())
    order = torch.empty(len(rows), dtype=torch.long)
    order[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return order.to(noise.device)


def training_noise(x0: torch.Tensor, offset_strength: float = 0.0, immiscible: bool = False):
    """The noise for a training batch x0: offset as asked, then assigned to images if asked."""
    noise = offset_noise(x0, offset_strength)
    return noise[immiscible_order(x0, noise)] if immiscible else noise
