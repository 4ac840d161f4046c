"""Training noise: offset noise statistics and immiscible (minimum-distance) pairing."""

from __future__ import annotations

import itertools

import pytest
import torch

from ldm.models.diffusion.noise import immiscible_order, offset_noise, training_noise


def test_offset_noise_adds_variance_shared_within_each_channel():
    x0 = torch.zeros(4096, 3, 8, 8)
    noise = offset_noise(x0, strength=0.5)
    channel_means = noise.mean(dim=(2, 3))  # (B, C): N(0, 1/64 + 0.25)
    assert channel_means.var().item() == pytest.approx(1 / 64 + 0.25, rel=0.05)
    within = noise - noise.mean(dim=(2, 3), keepdim=True)
    assert within.var().item() == pytest.approx(1 - 1 / 64, rel=0.02)  # per-pixel part unchanged
    plain = offset_noise(x0, strength=0.0)
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64, rel=0.1)


def total_distance(x0: torch.Tensor, noise: torch.Tensor) -> float:
    return (x0 - noise).flatten(1).norm(dim=1).sum().item()


@pytest.mark.parametrize("seed", range(5))
def test_immiscible_pairing_is_a_permutation_that_never_costs_more(seed):
    torch.manual_seed(seed)
    x0, noise = torch.randn(16, 4, 8, 8) + 0.5, torch.randn(16, 4, 8, 8)
    order = immiscible_order(x0, noise)
    assert sorted(order.tolist()) == list(range(16))
    assert total_distance(x0, noise[order]) <= total_distance(x0, noise) + 1e-4


def test_immiscible_pairing_is_the_optimum_on_a_small_batch():
    torch.manual_seed(0)
    x0, noise = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    best = min(total_distance(x0, noise[list(p)]) for p in itertools.permutations(range(5)))
    assert total_distance(x0, noise[immiscible_order(x0, noise)]) == pytest.approx(best, rel=1e-5)


def test_training_noise_keeps_the_same_noise_samples_when_immiscible():
    x0 = torch.randn(8, 4, 4, 4)
    torch.manual_seed(3)
    plain = training_noise(x0)
    torch.manual_seed(3)
    assigned = training_noise(x0, immiscible=True)
    assert sorted(assigned.flatten(1).sum(1).tolist()) == pytest.approx(
        sorted(plain.flatten(1).sum(1).tolist())
    )
