"""Zero-terminal-SNR schedules (Lin et al. 2024): rescaling, trailing sampling, guidance rescale."""

from __future__ import annotations

import pytest
import torch
from conftest import load_config, with_live_zero_layers
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import sample_ddim
from ldm.models.diffusion.guidance import cfg_eps_fn, rescale_guidance
from ldm.models.diffusion.schedule import make_ddim_timesteps
from ldm.util import instantiate_from_config

T = 1000
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def rescaled_alphas_cumprod() -> torch.Tensor:
    betas = schedule.rescale_zero_terminal_snr(
        schedule.make_beta_schedule("linear", T, 0.00085, 0.012)
    )
    return schedule.schedule_buffers(betas)["alphas_cumprod"]


def test_rescaled_schedule_reaches_snr_zero_and_matches_diffusers():
    betas = schedule.rescale_zero_terminal_snr(
        schedule.make_beta_schedule("linear", T, 0.00085, 0.012)
    )
    reference_betas = diffusers_rescale(DDIMScheduler(**SD).betas.double())
    assert reference_betas[-1] == 1  # diffusers' alphas_cumprod reaches exactly 0
    torch.testing.assert_close(betas[:-1], reference_betas[:-1], rtol=1e-6, atol=1e-12)
    ours = schedule.schedule_buffers(betas)["alphas_cumprod"]
    assert ours[-1].item() == pytest.approx(schedule.ZERO_SNR_FLOOR, rel=1e-9)  # 0 but for fp32
    # Lin et al. 2024, Alg. 1, written out: sqrt(alphas_cumprod) moved so that its last value is
    # 0, scaled so that its first is kept.
    sqrt_ac = torch.cumprod(1 - DDIMScheduler(**SD).betas.double(), 0).sqrt()
    first, last = sqrt_ac[0], sqrt_ac[-1]
    torch.testing.assert_close(ours.sqrt()[:-1], ((sqrt_ac - last) * first / (first - last))[:-1])
    assert ours[0].item() == pytest.approx(sqrt_ac[0].item() ** 2, rel=1e-9)
    assert schedule.snr(ours)[-1].item() == pytest.approx(2.0**-24, rel=1e-6)
    # At t = T, x_t is the noise and the v target -x0 (Salimans & Ho 2022), up to sqrt(floor).
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([T - 1] * 2)
    ac, sqrt_floor = ours.float(), 2.0**-12
    x_t, v = schedule.q_sample(x0, t, eps, ac), schedule.training_target("v", x0, t, eps, ac)
    torch.testing.assert_close(x_t - eps, sqrt_floor * x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(v + x0, sqrt_floor * eps, atol=1e-6, rtol=0)


def toy_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in for a v network."""
    return 0.8 * torch.tanh(x) - 0.3 * x + t.to(x).reshape(-1, 1, 1, 1) / T


def zero_snr_reference() -> DDIMScheduler:
    """diffusers' zero-terminal-SNR DDIM for a v model (Lin et al. 2024's settings)."""
    return DDIMScheduler(
        **SD,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
    )


def test_ddim_on_trailing_steps_matches_diffusers_zero_snr_v_sampling():
    ref = zero_snr_reference()
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


def test_zero_snr_model_samples_from_t_max_as_diffusers_does():
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(
        zero_terminal_snr=True,
        beta_schedule="linear",
        linear_start=0.00085,
        linear_end=0.012,
        first_stage_config={"target": "torch.nn.Identity"},
        cond_stage_config={"target": "torch.nn.Identity"},
    )
    model = instantiate_from_config(config).eval()
    with_live_zero_layers(model.model.diffusion_model)
    assert model.timestep_spacing == "trailing"
    assert model.alphas_cumprod[-1].item() == pytest.approx(schedule.ZERO_SNR_FLOOR, rel=1e-6)
    # a strong conditioning, so that guidance changes the spread of v and the rescale acts
    cond, uncond, x_T = 3 * torch.randn(1, 7, 32), torch.zeros(1, 7, 32), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        z = model.sample(
            cond, 1, steps=3, guidance_scale=3.0, uncond=uncond, guidance_rescale=0.7, x_T=x_T
        )
        ref = zero_snr_reference()
        ref.set_timesteps(3)
        assert ref.timesteps[0] == T - 1
        x = x_T
        for t in ref.timesteps:  # as diffusers' StableDiffusionPipeline guides and rescales
            v_c, v_u = model.apply_model(x, t[None], cond), model.apply_model(x, t[None], uncond)
            v = rescale_noise_cfg(v_u + 3.0 * (v_c - v_u), v_c, guidance_rescale=0.7)
            x = ref.step(v, t, x).prev_sample
    # 2**-24 in place of 0 at t = T: our x0 there goes through eps (see the test above)
    torch.testing.assert_close(z, x, atol=5e-3, rtol=0)
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
    for phi in (0.0, 0.7, 1.0):
        reference = rescale_noise_cfg(guided, cond, guidance_rescale=phi)
        torch.testing.assert_close(rescale_guidance(guided, cond, phi), reference)


class VModel:
    """A v-predicting stand-in for LatentDiffusion whose output's spread depends on cond."""

    parameterization, num_timesteps = "v", T

    def __init__(self):
        self.alphas_cumprod = rescaled_alphas_cumprod().float()

    def apply_model(self, x, t, cond):
        return toy_v(x, t) * (1 + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1))


def test_guidance_rescale_acts_on_the_models_own_prediction():
    model, x, t = VModel(), torch.randn(2, 4, 8, 8), torch.tensor([999, 400])
    cond, uncond = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    v_c, v_u = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
    expected_v = rescale_noise_cfg(v_u + 5.0 * (v_c - v_u), v_c, guidance_rescale=0.7)
    a = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = (1 - a).sqrt() * x + a.sqrt() * expected_v  # Salimans & Ho 2022, appendix D
    torch.testing.assert_close(cfg_eps_fn(model, cond, uncond, 5.0, rescale=0.7)(x, t), expected)
