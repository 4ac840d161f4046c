"""DiffusionLoss on its own (no LightningModule, autoencoder or text encoder), against the loss
written out: q_sample, each parameterisation's target, Min-SNR-gamma, the bound's weights and a
per-timestep log-variance (Ho et al. 2020; Hang et al. 2023)."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.loss import DiffusionLoss

T = 1000


def sd_betas() -> torch.Tensor:
    return torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2


def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear function of (x_t, t) in place of the UNet."""
    return 0.5 * torch.tanh(2 * x_t) + t.to(x_t).reshape(-1, 1, 1, 1) / T


@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_the_loss_object_alone_matches_the_closed_forms(parameterization, gamma):
    loss_fn = DiffusionLoss(
        sd_betas(), parameterization, min_snr_gamma=gamma, original_elbo_weight=0.3
    )
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 600, 999])
    logvar = torch.linspace(-1.0, 1.0, T)
    seen = {}

    def predict(x_t, t, self_cond):
        seen["x_t"], seen["self_cond"] = x_t, self_cond
        return net(x_t, t)

    loss, logs = loss_fn(predict, x0, t, eps, logvar=logvar)

    betas = sd_betas()
    ac = torch.cumprod(1 - betas, 0)
    a = ac[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(seen["x_t"], x_t.float())
    assert seen["self_cond"] is None
    target = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[parameterization]
    mse = ((net(x_t.float(), t).double() - target) ** 2).mean(dim=(1, 2, 3))  # (B,)
    snr = ac[t] / (1 - ac[t])
    weight = torch.ones(4, dtype=torch.float64)
    if gamma is not None:
        clipped = snr.clamp(max=gamma)
        weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[parameterization]
    s = t.clamp(min=1)  # t = 0 borrows t = 1's bound weight (its posterior variance is 0)
    variance = betas[s] * (1 - ac[s - 1]) / (1 - ac[s])
    eps_weight = betas[s] ** 2 / (2 * variance * (1 - betas[s]) * (1 - ac[s]))
    x0_weight = (betas[s] * ac[s - 1].sqrt() / (1 - ac[s])) ** 2 / (2 * variance)
    vlb = {"eps": eps_weight, "x0": x0_weight, "v": eps_weight * ac[s]}[parameterization]
    lv = logvar[t].double()
    expected = (weight * mse / lv.exp() + lv).mean() + 0.3 * (vlb * mse).mean()
    torch.testing.assert_close(logs["train/loss_simple"].double(), mse.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        logs["train/loss_vlb"].double(), (vlb * mse).mean(), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)


def test_self_conditioning_feeds_the_detached_first_estimate_in_training_only():
    loss_fn = DiffusionLoss(sd_betas(), "v", self_conditioning=True)
    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([100, 900])
    calls = []

    def predict(x_t, t, self_cond):
        calls.append(self_cond)
        return net(x_t, t)

    torch.manual_seed(0)
    for _ in range(40):
        loss_fn(predict, x0, t, eps)
    firsts = [c for c in calls if c is None]
    fed = [c for c in calls if c is not None]
    assert 10 < len(fed) < 30 and len(firsts) == 40  # about half the batches get a second pass
    ac = torch.cumprod(1 - sd_betas(), 0).float()
    a = ac[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_estimate = a.sqrt() * x_t - (1 - a).sqrt() * net(x_t, t)  # x0 from a v prediction
    torch.testing.assert_close(fed[0], x0_estimate, rtol=1e-5, atol=1e-5)
    calls.clear()
    for _ in range(10):
        loss_fn(predict, x0, t, eps, training=False)
    assert calls == [None] * 10


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="parameterization 'score'"):
        DiffusionLoss(sd_betas(), "score")
    with pytest.raises(ValueError, match="loss_type 'huber'"):
        DiffusionLoss(sd_betas(), loss_type="huber")
