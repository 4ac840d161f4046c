"""Training noise: offset noise statistics and immiscible (minimum-distance) pairing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from ldm.models.diffusion.noise import immiscible_order, offset_noise, training_noise


@pytest.mark.parametrize("strength", [0.0, 0.1, 0.5])
def test_offset_noise_has_the_closed_form_distribution(strength):
    # Each (sample, channel) of 8 x 8: a mean of 64 unit normals plus strength * N(0, 1), and a
    # spread about that mean the shared offset leaves alone, so 63 s^2 ~ chi2(63).
    noise = offset_noise(torch.zeros(2048, 3, 8, 8), strength).double()
    means = noise.mean(dim=(2, 3)).flatten().numpy()
    spread = 63 * noise.flatten(2).var(dim=2).flatten().numpy()
    assert stats.kstest(means, stats.norm(scale=(1 / 64 + strength**2) ** 0.5).cdf).pvalue > 1e-3
    assert stats.kstest(spread, stats.chi2(63).cdf).pvalue > 1e-3
    pixels = noise[:64].flatten().numpy()  # each pixel alone: N(0, 1 + strength^2)
    assert stats.kstest(pixels, stats.norm(scale=(1 + strength**2) ** 0.5).cdf).pvalue > 1e-3


def total_distance(x0: torch.Tensor, noise: torch.Tensor) -> float:
    return (x0 - noise).flatten(1).norm(dim=1).sum().item()


@pytest.mark.parametrize("seed", range(3))
def test_immiscible_pairing_reaches_the_assignment_optimum(seed):
    torch.manual_seed(seed)
    x0, noise = torch.randn(32, 4, 8, 8) + 0.5, torch.randn(32, 4, 8, 8)
    order = immiscible_order(x0, noise)
    assert sorted(order.tolist()) == list(range(32))
    a, b = x0.flatten(1).double().numpy(), noise.flatten(1).double().numpy()
    cost = np.linalg.norm(a[:, None] - b[None], axis=-1)  # (B, B) written out, not cdist
    rows, cols = optimize.linear_sum_assignment(cost)
    assert total_distance(x0, noise[order]) == pytest.approx(cost[rows, cols].sum(), rel=1e-5)


def test_immiscible_pairing_is_the_brute_force_optimum_on_a_small_batch():
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    best = min(itertools.permutations(range(6)), key=lambda p: total_distance(x0, noise[list(p)]))
    assert immiscible_order(x0, noise).tolist() == list(best)


def test_training_noise_pairs_the_same_draws_by_the_optimal_permutation():
    x0 = torch.randn(6, 4, 4, 4)
    torch.manual_seed(3)
    plain = training_noise(x0, 0.2)
    torch.manual_seed(3)
    assigned = training_noise(x0, 0.2, immiscible=True)
    best = min(itertools.permutations(range(6)), key=lambda p: total_distance(x0, plain[list(p)]))
    torch.testing.assert_close(assigned, plain[list(best)], atol=0, rtol=0)
