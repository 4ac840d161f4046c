"""Zero-terminal-SNR schedules (Lin et al. 2024): rescaling, trailing sampling, guidance rescale."""

from __future__ import annotations

import pytest
import torch
from conftest import load_config
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import make_ddim_timesteps, sample_ddim
from ldm.models.diffusion.guidance import cfg_eps_fn, rescale_guidance
from ldm.util import instantiate_from_config

T = 1000
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def rescaled_alphas_cumprod() -> torch.Tensor:
    betas = schedule.rescale_zero_terminal_snr(
        schedule.make_beta_schedule("linear", T, 0.00085, 0.012)
    )
    return schedule.schedule_buffers(betas)["alphas_cumprod"]


def test_rescaled_schedule_reaches_snr_zero_and_matches_diffusers():
    ours = rescaled_alphas_cumprod()
    reference = torch.cumprod(1 - diffusers_rescale(DDIMScheduler(**SD).betas.double()), 0)
    assert reference[-1] == 0 and ours[-1].item() == pytest.approx(schedule.ZERO_SNR_FLOOR)
    torch.testing.assert_close(ours[:-1], reference[:-1], rtol=1e-6, atol=1e-9)
    original = schedule.schedule_buffers(schedule.make_beta_schedule("linear", T, 0.00085, 0.012))
    assert ours[0] == pytest.approx(original["alphas_cumprod"][0].item())  # first level kept
    assert (ours[1:] < ours[:-1]).all()
    assert schedule.snr(ours)[-1] < 1e-7


def toy_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in for a v network."""
    return 0.8 * torch.tanh(x) - 0.3 * x + t.to(x).reshape(-1, 1, 1, 1) / T


def test_ddim_on_trailing_steps_matches_diffusers_zero_snr_v_sampling():
    ref = DDIMScheduler(
        **SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
    )  # fmt: skip
    ref.set_timesteps(10)
    timesteps = make_ddim_timesteps(10, T, "trailing")
    assert torch.equal(timesteps, ref.timesteps) and timesteps[0] == T - 1
    ac = rescaled_alphas_cumprod().float()

    def eps_fn(x, t):
        return schedule.eps_from_v(x, t, toy_v(x, t), ac)

    steps = []
    x_T = torch.randn(2, 4, 8, 8)
    sample_ddim(eps_fn, x_T, timesteps, ac, callback=steps.append)
    x = x_T
    for t, step in zip(ref.timesteps, steps, strict=True):
        out = ref.step(toy_v(x, t.expand(2)), t, x)
        # 2**-24 in place of 0 at t = T: through eps, x0 there carries float32 rounding of
        # x divided by sqrt(2**-24), a few 1e-3 for |x| ~ 4; diffusers reads x0 off v directly
        torch.testing.assert_close(step["x0"], out.pred_original_sample, atol=5e-3, rtol=0)
        torch.testing.assert_close(step["x"], out.prev_sample, atol=5e-3, rtol=0)
        x = out.prev_sample


def test_zero_snr_model_needs_v_or_x0_and_samples_from_t_max():
    config = load_config("tiny/txt2img.yaml").model
    config.params.zero_terminal_snr = True
    model = instantiate_from_config(config)
    assert model.timestep_spacing == "trailing" and model.alphas_cumprod[-1] < 1e-7
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a red circle on a blue background"])
        uncond = model.get_learned_conditioning([""])
        z = model.sample(cond, 1, steps=3, guidance_scale=3.0, uncond=uncond, guidance_rescale=0.7)
    assert torch.isfinite(z).all()
    config.params.parameterization = "eps"
    with pytest.raises(ValueError, match="zero_terminal_snr needs parameterization v or x0"):
        instantiate_from_config(config)


def test_rescale_guidance_matches_the_conditional_std():
    guided, cond = 3 * torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    mixed = rescale_guidance(guided, cond, 0.7)
    torch.testing.assert_close(mixed, 0.7 * full + 0.3 * guided)


class VModel:
    """A v-predicting stand-in for LatentDiffusion with a cond-dependent output."""

    parameterization, num_timesteps = "v", T

    def __init__(self):
        self.alphas_cumprod = rescaled_alphas_cumprod().float()

    def apply_model(self, x, t, cond):
        return toy_v(x, t) + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_guidance_rescale_acts_on_the_models_own_prediction():
    model, x, t = VModel(), torch.randn(2, 4, 8, 8), torch.tensor([999, 400])
    cond, uncond = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    v_c, v_u = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
    expected_v = rescale_guidance(v_u + 5.0 * (v_c - v_u), v_c, 0.7)
    expected = schedule.eps_from_v(x, t, expected_v, model.alphas_cumprod)
    torch.testing.assert_close(cfg_eps_fn(model, cond, uncond, 5.0, rescale=0.7)(x, t), expected)
