"""The diffusion process functions: schedules, noising, parameterisations, loss weights."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.models.diffusion import schedule

SD_START, SD_END, T = 0.00085, 0.012, 1000


def sd_alphas_cumprod() -> torch.Tensor:
    betas = schedule.make_beta_schedule("linear", T, SD_START, SD_END)
    return schedule.schedule_buffers(betas)["alphas_cumprod"].float()


def test_sd_linear_schedule_matches_diffusers_scaled_linear():
    reference = DDPMScheduler(beta_start=SD_START, beta_end=SD_END, beta_schedule="scaled_linear")
    torch.testing.assert_close(sd_alphas_cumprod(), reference.alphas_cumprod)
    assert sd_alphas_cumprod()[0].item() == pytest.approx(1 - SD_START)
    sigma_max = ((1 - sd_alphas_cumprod()[-1]) / sd_alphas_cumprod()[-1]).sqrt()
    assert sigma_max.item() == pytest.approx(14.6146, abs=1e-3)  # SD's well-known sigma_max


def test_cosine_schedule_matches_diffusers_squaredcos():
    betas = schedule.make_beta_schedule("cosine", T, SD_START, SD_END)
    reference = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(betas.float(), reference.betas)


@pytest.mark.parametrize("kind", ["sqrt_linear", "sqrt"])
def test_other_original_schedules_are_increasing_betas(kind):
    betas = schedule.make_beta_schedule(kind, T, 1e-4, 2e-2)
    assert betas.shape == (T,) and (betas.diff() > 0).all() and (betas < 1).all()


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'quadratic'.*linear"):
        schedule.make_beta_schedule("quadratic", T, SD_START, SD_END)


def test_buffers_have_the_original_names_and_relations():
    buffers = schedule.schedule_buffers(schedule.make_beta_schedule("linear", T, SD_START, SD_END))
    ac = buffers["alphas_cumprod"]
    torch.testing.assert_close(buffers["alphas_cumprod_prev"][1:], ac[:-1])
    torch.testing.assert_close(buffers["sqrt_recip_alphas_cumprod"] ** 2 * ac, torch.ones_like(ac))
    torch.testing.assert_close(buffers["sqrt_recipm1_alphas_cumprod"] ** 2, 1 / ac - 1)
    assert buffers["posterior_variance"][0] == 0
    # The original's log(max(variance, 1e-20)): finite at t = 0, the plain log after.
    log_variance = buffers["posterior_log_variance_clipped"]
    assert log_variance[0].item() == pytest.approx(math.log(1e-20))
    torch.testing.assert_close(log_variance[1:], buffers["posterior_variance"][1:].log())
    # x_{t-1}'s posterior mean is x_t itself when x0 = x_t / sqrt(a_t) has no noise: at t = 0
    # coef1 = 1 and coef2 = 0 (Ho et al. 2020, eq. 7).
    assert buffers["posterior_mean_coef1"][0] == pytest.approx(1.0)
    assert buffers["posterior_mean_coef2"][0] == 0


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    eps = torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    return x0, eps, t


def test_q_sample_inverts_for_x0_and_eps():
    ac = sd_alphas_cumprod()
    x0, eps, t = batch()
    x_t = schedule.q_sample(x0, t, eps, ac)
    torch.testing.assert_close(schedule.x0_from_eps(x_t, t, eps, ac), x0)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, t, x0, ac), eps)


def test_v_conversions_round_trip():
    ac = sd_alphas_cumprod()
    x0, eps, t = batch()
    x_t = schedule.q_sample(x0, t, eps, ac)
    v = schedule.v_from_eps(x0, t, eps, ac)
    torch.testing.assert_close(schedule.x0_from_v(x_t, t, v, ac), x0)
    torch.testing.assert_close(schedule.eps_from_v(x_t, t, v, ac), eps)


def test_v_target_matches_diffusers_velocity():
    reference = DDPMScheduler(beta_start=SD_START, beta_end=SD_END, beta_schedule="scaled_linear")
    x0, eps, t = batch()
    ours = schedule.training_target("v", x0, t, eps, sd_alphas_cumprod().float())
    torch.testing.assert_close(ours, reference.get_velocity(x0, eps, t))


def test_training_targets_and_unknown_parameterization():
    ac = sd_alphas_cumprod()
    x0, eps, t = batch()
    assert schedule.training_target("eps", x0, t, eps, ac) is eps
    assert schedule.training_target("x0", x0, t, eps, ac) is x0
    with pytest.raises(ValueError, match="'score'"):
        schedule.training_target("score", x0, t, eps, ac)


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().flatten(1).sum(1)


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_vlb_weights_agree_across_parameterizations(parameterization):
    """The bound's L_t is one number: each parameterisation's weighted error must give it."""
    betas = schedule.make_beta_schedule("linear", T, SD_START, SD_END)
    ac = schedule.schedule_buffers(betas)["alphas_cumprod"]
    x0, eps, t = batch()
    x0, eps, t = x0[1:].double(), eps[1:].double(), t[1:]  # t = 0 has no bound term
    x_t = schedule.q_sample(x0, t, eps, ac)
    eps_hat = eps + 0.1 * torch.randn_like(eps)
    x0_hat = schedule.x0_from_eps(x_t, t, eps_hat, ac)
    pairs = {
        "x0": (x0_hat, x0),
        "v": (schedule.v_from_eps(x0_hat, t, eps_hat, ac), schedule.v_from_eps(x0, t, eps, ac)),
    }
    eps_term = schedule.vlb_weights(betas, "eps").double()[t] * squared_error(eps_hat, eps)
    weights = schedule.vlb_weights(betas, parameterization).double()[t]
    other_term = weights * squared_error(*pairs[parameterization])
    torch.testing.assert_close(other_term, eps_term, rtol=1e-4, atol=0)


def test_snr_falls_with_t():
    snr = schedule.snr(sd_alphas_cumprod())
    assert (snr.diff() < 0).all()


SNRS = torch.tensor([0.5, 1.0, 5.0, 20.0], dtype=torch.float64)
MIN_SNR_EXPECTED = {
    "eps": [1.0, 1.0, 1.0, 0.25],  # min(SNR, 5) / SNR
    "x0": [0.5, 1.0, 5.0, 5.0],  # min(SNR, 5)
    "v": [0.5 / 1.5, 0.5, 5 / 6, 5 / 21],  # min(SNR, 5) / (SNR + 1)
}


@pytest.mark.parametrize("parameterization", list(MIN_SNR_EXPECTED))
def test_min_snr_weights_at_known_snrs(parameterization):
    alphas_cumprod = SNRS / (1 + SNRS)
    weights = schedule.min_snr_weights(alphas_cumprod, parameterization, gamma=5.0)
    expected = torch.tensor(MIN_SNR_EXPECTED[parameterization])
    torch.testing.assert_close(weights, expected)


def test_min_snr_weighted_losses_are_the_same_x0_loss_for_every_target():
    """w_eps |eps err|^2 = w_v |v err|^2 = w_x0 |x0 err|^2 = min(SNR, gamma) |x0 err|^2."""
    alphas_cumprod = sd_alphas_cumprod()
    t = torch.tensor([5, 300, 700, 990])
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    x_t = schedule.q_sample(x0, t, eps, alphas_cumprod)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)  # some model's estimate
    estimates = {
        "x0": (x0_hat, x0),
        "eps": (schedule.eps_from_x0(x_t, t, x0_hat, alphas_cumprod), eps),
        "v": (
            schedule.v_from_eps(
                x0_hat, t, schedule.eps_from_x0(x_t, t, x0_hat, alphas_cumprod), alphas_cumprod
            ),
            schedule.v_from_eps(x0, t, eps, alphas_cumprod),
        ),
    }
    losses = {}
    for name, (prediction, target) in estimates.items():
        weights = schedule.min_snr_weights(alphas_cumprod, name, gamma=5.0)[t]
        losses[name] = weights * ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    x0_loss = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    expected = schedule.snr(alphas_cumprod)[t].clamp(max=5.0) * x0_loss
    for name, loss in losses.items():
        torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-6, msg=name)


def test_min_snr_rejects_bad_input():
    with pytest.raises(ValueError, match="min_snr_gamma=0"):
        schedule.min_snr_weights(sd_alphas_cumprod(), "eps", 0.0)
    with pytest.raises(ValueError, match="'sample'"):
        schedule.min_snr_weights(sd_alphas_cumprod(), "sample", 5.0)


def test_sigmoid_schedule_follows_its_closed_form():
    n, start, end, tau = 1000, -3.0, 3.0, 0.7
    betas = schedule.make_beta_schedule(
        "sigmoid", n, SD_START, SD_END, sigmoid_start=start, sigmoid_end=end, sigmoid_tau=tau
    )
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)

    def sig(v):
        return 1 / (1 + torch.exp(-torch.as_tensor(v, dtype=torch.float64)))

    expected = (sig(end / tau) - sig((t * (end - start) + start) / tau)) / (
        sig(end / tau) - sig(start / tau)
    )
    torch.testing.assert_close(alphas_cumprod[(t * n).long() - 1], expected)
    assert (betas > 0).all() and (betas <= schedule.MAX_BETA).all()
    with pytest.raises(ValueError, match="sigmoid_start < sigmoid_end"):
        schedule.make_beta_schedule("sigmoid", n, SD_START, SD_END, sigmoid_start=3.0)


def test_scaled_linear_is_sds_linear():
    linear = schedule.make_beta_schedule("linear", T, SD_START, SD_END)
    torch.testing.assert_close(
        schedule.make_beta_schedule("scaled_linear", T, SD_START, SD_END), linear
    )
