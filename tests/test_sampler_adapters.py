"""The original CompVis sampler APIs (DDIMSampler, PLMSSampler, DPMSolverSampler) against
diffusers' schedulers stepped by hand: on a fake model, the tiny real UNet and LatentDiffusion."""

from __future__ import annotations

import pytest
import torch
from conftest import load_config, with_live_zero_layers
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from sampler_fakes import SD_BETAS, FakeModel, T

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import instantiate_from_config

# Each adapter's grid in diffusers' terms. DDIMSampler and PLMSSampler default to "uniform", the
# original's range(0, T, T // S) + 1: diffusers' "leading" with steps_offset=1 when S divides T
# (for other S, e.g. 30, the original takes S + 1 steps); both end at alphas_cumprod[0]
# (set_alpha_to_one=False). DPMSolverSampler follows the model's spacing as they do; here it is
# given "linspace", the grid of the SD 2.x original and of diffusers' DPMSolverMultistepScheduler,
# which also ends there (final_sigmas_type="sigma_min"). Zero-terminal-SNR models sample on
# "trailing" (test_zero_snr).
SCHEDULERS = {
    "ddim": lambda **kw: DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw
    ),
    "plms": lambda **kw: PNDMScheduler(
        **SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **kw
    ),
    "dpm": lambda **kw: DPMSolverMultistepScheduler(
        **SD_BETAS, algorithm_type="dpmsolver++", final_sigmas_type="sigma_min", **kw
    ),
}


def diffusers_steps(ref, timesteps, model_fn, x, eta=0.0, generator=None) -> torch.Tensor:
    """x stepped by the diffusers scheduler `ref` down `timesteps`, model_fn(x, t) at each."""
    for t in timesteps:
        noise = {}
        if eta > 0:  # drawn in step order, as ours
            noise = {"eta": eta, "variance_noise": torch.randn(x.shape, generator=generator)}
        x = ref.step(model_fn(x, t.expand(len(x))), t, x, **noise).prev_sample
    return x


def diffusers_sample(name: str, model_fn, x_T, steps: int, eta=0.0, generator=None, **config):
    """x_T sampled over `steps` by the diffusers scheduler matching the adapter `name`."""
    ref = SCHEDULERS[name](**config)
    ref.set_timesteps(steps)
    return diffusers_steps(ref, ref.timesteps, model_fn, x_T, eta, generator)


def guided_by_hand(predict, cond, uncond, scale: float):
    """(x, t) -> p_u + scale (p_c - p_u) from two separate calls (Ho & Salimans 2022, eq. 6)."""

    def guided(x, t):
        p_c, p_u = predict(x, t, cond), predict(x, t, uncond)
        return p_u + scale * (p_c - p_u)

    return guided


def linspace_dpm(model) -> DPMSolverSampler:
    """DPMSolverSampler on the "linspace" grid of diffusers' DPMSolverMultistepScheduler."""
    return DPMSolverSampler(model, timestep_spacing="linspace")


def guided_adapter_sample(sampler, model, cond, uncond, x_T, steps: int = 3, scale=4.0):
    """Samples from x_T by the adapter class `sampler`, called as the scripts call it: guided,
    `steps` steps, no intermediates wanted."""
    samples, _ = sampler(model).sample(
        S=steps,
        batch_size=len(x_T),
        shape=tuple(x_T.shape[1:]),
        conditioning=cond,
        x_T=x_T,
        verbose=False,
        unconditional_guidance_scale=scale,
        unconditional_conditioning=uncond,
    )
    return samples


ADAPTERS = {"ddim": (DDIMSampler, 10), "plms": (PLMSSampler, 11), "dpm": (linspace_dpm, 10)}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_match_diffusers_with_one_model_call_per_step(name):
    cls, calls = ADAPTERS[name]
    model, x_T = FakeModel(), torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 3, 5), torch.zeros(2, 3, 5)
    x_T_copy, seen = x_T.clone(), []
    samples, intermediates = cls(model).sample(
        S=10,
        batch_size=2,
        shape=(4, 8, 8),
        conditioning=cond,
        x_T=x_T,
        eta=0.0,
        verbose=False,
        unconditional_guidance_scale=5.0,
        unconditional_conditioning=uncond,
        callback=seen.append,
    )
    assert model.calls == calls and seen == list(range(10))
    assert torch.equal(x_T, x_T_copy)  # inputs are not mutated
    expected = diffusers_sample(name, guided_by_hand(model.true_eps, cond, uncond, 5.0), x_T, 10)
    torch.testing.assert_close(samples, expected, atol=1e-5, rtol=0)
    if name == "dpm":
        assert intermediates is None
    else:  # logged at the first step and every log_every_t steps to the end, as the original
        assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 3
        assert intermediates["x_inter"][0] is x_T and torch.equal(
            intermediates["x_inter"][-1], samples
        )


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_adapter_with_eta_matches_diffusers_noise_for_noise(parameterization):
    model, x_T = FakeModel(parameterization), torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    samples, _ = DDIMSampler(model).sample(
        S=20,
        batch_size=2,
        shape=(4, 8, 8),
        conditioning=cond,
        x_T=x_T,
        eta=0.7,
        generator=torch.Generator().manual_seed(1),
        verbose=False,
        unconditional_guidance_scale=3.0,
        unconditional_conditioning=uncond,
    )
    guided = guided_by_hand(model.true_eps, cond, uncond, 3.0)
    generator = torch.Generator().manual_seed(1)
    expected = diffusers_sample("ddim", guided, x_T, 20, eta=0.7, generator=generator)
    torch.testing.assert_close(samples, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.parametrize(
    "option,value",
    [
        ("mask", torch.ones(1)),
        ("x0", torch.ones(1)),
        ("quantize_x0", True),
        ("temperature", 0.5),
        ("noise_dropout", 0.1),
        ("score_corrector", object()),
        ("dynamic_threshold", 0.9),
        ("no_such_option", 1),
    ],
)
def test_adapters_refuse_unsupported_options_by_name(name, option, value):
    cls = ADAPTERS[name][0]
    with pytest.raises(NotImplementedError, match=option):
        cls(FakeModel()).sample(
            S=2, batch_size=1, shape=(4, 8, 8), verbose=False, **{option: value}
        )


def test_adapters_accept_defaults_and_refuse_eta_where_deterministic():
    model, x_T = FakeModel(), torch.randn(1, 4, 8, 8)
    DPMSolverSampler(model).sample(
        S=2, batch_size=1, shape=(4, 8, 8), x_T=x_T, eta=0.0, dynamic_threshold=None, verbose=False
    )
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(model).sample(S=2, batch_size=1, shape=(4, 8, 8), eta=0.5, verbose=False)
    with pytest.raises(NotImplementedError, match="eta"):
        DPMSolverSampler(model).sample(S=2, batch_size=1, shape=(4, 8, 8), eta=0.5, verbose=False)


def test_ddim_is_deterministic_at_eta_0_and_seeded_by_generator():
    model = FakeModel()

    def run(eta: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return DDIMSampler(model).sample(
            S=5, batch_size=2, shape=(4, 8, 8), eta=eta, generator=g, verbose=False
        )[0]

    assert torch.equal(run(0.0, 0), run(0.0, 0))
    assert torch.equal(run(1.0, 0), run(1.0, 0)) and not torch.equal(run(1.0, 0), run(1.0, 1))


def test_ddim_img2img_encodes_then_decodes_the_remaining_steps():
    model = FakeModel()
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, ddim_eta=0.0, verbose=False)
    x0, noise, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 3, 5)
    t_enc = int(0.5 * 10)
    z = sampler.stochastic_encode(x0, torch.tensor([t_enc] * 2), noise=noise)
    a = model.alphas_cumprod[501]  # DDIM step 5 of 1, 101, ..., 901
    torch.testing.assert_close(z, a.sqrt() * x0 + (1 - a).sqrt() * noise)

    def eps_fn(x, t):
        return model.true_eps(x, t, cond)

    ref = SCHEDULERS["ddim"]()
    ref.set_timesteps(10)
    seen = []
    out = sampler.decode(z, cond, t_enc, callback=seen.append)
    lowest = ref.timesteps[-t_enc:]  # 401, ..., 1: one step below z's level, as the original
    torch.testing.assert_close(out, diffusers_steps(ref, lowest, eps_fn, z), atol=1e-5, rtol=0)
    assert seen == list(range(t_enc))

    every = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=True)
    every.set_timesteps(T)  # 999, ..., 0, then to alpha = 1
    original = sampler.decode(z, cond, 3, use_original_steps=True)
    expected = diffusers_steps(every, every.timesteps[-3:], eps_fn, z)
    torch.testing.assert_close(original, expected, atol=1e-5, rtol=0)

    sampler.make_schedule(10, ddim_eta=0.5, verbose=False)
    noisy = sampler.decode(z, cond, t_enc, generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    expected = diffusers_steps(ref, lowest, eps_fn, z, eta=0.5, generator=generator)
    torch.testing.assert_close(noisy, expected, atol=1e-5, rtol=0)


class UNetModelWrapper:
    """The tiny config's real UNet behind the attributes the samplers use."""

    num_timesteps, device, parameterization = T, torch.device("cpu"), "eps"

    def __init__(self):
        unet_config = load_config("tiny/txt2img.yaml").model.params.unet_config
        self.unet = with_live_zero_layers(instantiate_from_config(unet_config).eval())
        self.alphas_cumprod = FakeModel().alphas_cumprod

    def apply_model(self, x_t, t, cond):
        return self.unet(x_t, t, context=cond)


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_sample_the_tiny_real_unet_as_diffusers_does(name):
    model = UNetModelWrapper()
    cond, uncond, x_T = torch.randn(2, 7, 32), torch.zeros(2, 7, 32), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        t = torch.tensor([500, 500])
        assert not torch.allclose(
            model.apply_model(x_T, t, cond), model.apply_model(x_T, t, uncond)
        )
        samples = guided_adapter_sample(ADAPTERS[name][0], model, cond, uncond, x_T)
        guided = guided_by_hand(model.apply_model, cond, uncond, 4.0)
        expected = diffusers_sample(name, guided, x_T, 3)
    # The guided samples reach |x| ~ 60 and rounding errors of that size spread to every
    # element: float32 alone differs by ~2.5e-6 of the largest |x| between CPUs (1.5e-4 on one).
    scale = expected.abs().max().item()
    torch.testing.assert_close(samples, expected, atol=max(1e-4, 1e-5 * scale), rtol=0)


def tiny_v_model(**params):
    """The tiny LatentDiffusion (v-prediction) on SD's schedule, its UNet's zero layers live."""
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(beta_schedule="linear", linear_start=0.00085, linear_end=0.012, **params)
    model = instantiate_from_config(config).eval()
    with_live_zero_layers(model.model.diffusion_model)
    return model


def test_latent_diffusion_apply_model_drives_the_samplers():
    model = tiny_v_model(
        first_stage_config={"target": "torch.nn.Identity"},
        cond_stage_config={"target": "torch.nn.Identity"},
    )
    assert model.parameterization == "v"
    cond, uncond, x_T = torch.randn(2, 7, 32), torch.zeros(2, 7, 32), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        samples = guided_adapter_sample(DDIMSampler, model, cond, uncond, x_T)
        guided_v = guided_by_hand(model.apply_model, cond, uncond, 4.0)
        expected = diffusers_sample("ddim", guided_v, x_T, 3, prediction_type="v_prediction")
    torch.testing.assert_close(samples, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ADAPTERS)
def test_tiny_latent_diffusion_samples_with_every_adapter_as_diffusers_does(name):
    model = tiny_v_model()
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a red square", "a blue circle"])
        uncond = model.get_learned_conditioning(["", ""])
        x_T = torch.randn(2, 4, 8, 8)
        samples = guided_adapter_sample(ADAPTERS[name][0], model, cond, uncond, x_T)
        guided_v = guided_by_hand(model.apply_model, cond, uncond, 4.0)
        a = DDIMScheduler(**SD_BETAS).alphas_cumprod

        def guided_eps(x, t):  # diffusers' PNDM would combine v, not eps, across its steps
            a_t = a[t].reshape(-1, 1, 1, 1)
            return (1 - a_t).sqrt() * x + a_t.sqrt() * guided_v(x, t)  # Salimans & Ho, app. D

        expected = diffusers_sample(name, guided_eps, x_T, 3)
        torch.testing.assert_close(samples, expected, atol=1e-4, rtol=0)
        assert model.decode_first_stage(samples).shape == (2, 3, 32, 32)
