"""The sampling door (`ldm.models.diffusion.sampling`): each sampler by name, against the CompVis
adapters and against the pure sampler functions called on timesteps written out here."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion import sampling, schedule
from ldm.models.diffusion.ddim import DDIMSampler, sample_ddim
from ldm.models.diffusion.dpm_solver import DPMSolverSampler, sample_dpmpp_2m
from ldm.models.diffusion.guidance import cfg_eps_fn
from ldm.models.diffusion.plms import PLMSSampler, sample_plms
from ldm.models.diffusion.sampler_api import model_timesteps

T = 1000
ADAPTERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler}
FUNCTIONS = {"ddim": sample_ddim, "plms": sample_plms, "dpm": sample_dpmpp_2m}
# The original's "uniform" grid for 10 of 1000 steps, descending: range(0, T, T // S) + 1.
UNIFORM_10 = torch.arange(0, T, T // 10).flip(0) + 1
# diffusers' "trailing" grid (zero-terminal-SNR models) for 10 of 1000 steps.
TRAILING_10 = torch.arange(T - 1, 0, -(T // 10))


class ToyModel:
    """What the samplers use of LatentDiffusion: an eps prediction depending on x, t and cond."""

    num_timesteps, device, parameterization = T, torch.device("cpu"), "eps"
    channels, image_size = 4, 8

    def __init__(self, timestep_spacing: str | None = None):
        betas = schedule.make_beta_schedule("linear", T, 0.00085, 0.012)
        self.alphas_cumprod = schedule.schedule_buffers(betas)["alphas_cumprod"].float()
        if timestep_spacing is not None:
            self.timestep_spacing = timestep_spacing

    def apply_model(self, x_t, t, cond=None):
        bias = 0 if cond is None else cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return x_t + 0.2 * torch.tanh(x_t + t.to(x_t).reshape(-1, 1, 1, 1) / T) + bias


def inputs(batch: int = 2):
    torch.manual_seed(0)
    return torch.randn(batch, 4, 8, 8), torch.randn(batch, 3, 5), torch.zeros(batch, 3, 5)


def test_uniform_and_trailing_grids_are_the_models_own():
    assert torch.equal(model_timesteps(ToyModel(), 10), UNIFORM_10)
    assert torch.equal(model_timesteps(ToyModel("trailing"), 10), TRAILING_10)
    explicit = model_timesteps(ToyModel("trailing"), 10, "uniform")
    assert torch.equal(explicit, UNIFORM_10)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(3)


@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
@pytest.mark.parametrize("spacing", [None, "trailing"])
def test_each_sampler_by_name_equals_its_adapter_and_its_function(name, spacing):
    model, (x_T, cond, uncond) = ToyModel(spacing), inputs()
    eta = 0.5 if name == "ddim" else 0.0  # with DDIM's noise drawn from the generator
    door = sampling.sample(
        model,
        cond,
        uncond,
        sampler=name,
        steps=10,
        guidance_scale=4.0,
        guidance_rescale=0.5,
        eta=eta,
        x_T=x_T,
        generator=seeded(),
    )
    adapter, _ = ADAPTERS[name](model).sample(
        S=10,
        batch_size=2,
        shape=(4, 8, 8),
        conditioning=cond,
        x_T=x_T,
        eta=eta,
        verbose=False,
        unconditional_guidance_scale=4.0,
        unconditional_conditioning=uncond,
        guidance_rescale=0.5,
        generator=seeded(),
    )
    torch.testing.assert_close(door, adapter, atol=0, rtol=0)
    timesteps = TRAILING_10 if spacing == "trailing" else UNIFORM_10
    options = {"eta": eta, "generator": seeded()} if name == "ddim" else {}
    eps_fn = cfg_eps_fn(model, cond, uncond, 4.0, 0.5)
    direct = FUNCTIONS[name](eps_fn, x_T, timesteps, model.alphas_cumprod, **options)
    torch.testing.assert_close(door, direct, atol=0, rtol=0)


def test_fresh_noise_takes_the_models_shape_and_the_generator():
    model = ToyModel()
    latents = sampling.sample(
        model, None, steps=3, batch_size=2, generator=torch.Generator().manual_seed(1)
    )
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(latents, sampling.sample(model, None, steps=3, x_T=x_T))
    with pytest.raises(ValueError, match="batch_size"):
        sampling.sample(model, None, steps=3)


@pytest.mark.parametrize("name", ["plms", "dpm"])
def test_eta_is_refused_by_name_where_the_sampler_is_deterministic(name):
    x_T, cond, _ = inputs()
    with pytest.raises(ValueError, match=f"sampler '{name}' takes no eta"):
        sampling.sample(ToyModel(), cond, sampler=name, steps=3, eta=0.5, x_T=x_T)
    with pytest.raises(ValueError, match="takes no eta"):
        sampling.img2img(ToyModel(), x_T, cond, sampler=name, strength=0.5, steps=4, eta=0.5)
    with pytest.raises(ValueError, match="'euler'"):
        sampling.sample(ToyModel(), cond, sampler="euler", steps=3, x_T=x_T)


@pytest.mark.parametrize("steps,strength", [(10, 0.5), (10, 0.3), (3, 1 / 3), (30, 0.4)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_img2img_equals_stochastic_encode_then_decode(steps, strength, eta):
    model, (z0, cond, uncond) = ToyModel(), inputs()
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5))
    door = sampling.img2img(
        model,
        z0,
        cond,
        uncond,
        strength=strength,
        steps=steps,
        guidance_scale=3.0,
        eta=eta,
        noise=noise,
        generator=torch.Generator().manual_seed(6),
    )
    sampler = DDIMSampler(model)
    sampler.make_schedule(steps, ddim_eta=eta, verbose=False)
    t_enc = round(strength * steps)
    z_t = sampler.stochastic_encode(z0, torch.full((2,), t_enc), noise=noise)
    original = sampler.decode(
        z_t,
        cond,
        t_enc,
        unconditional_guidance_scale=3.0,
        unconditional_conditioning=uncond,
        generator=torch.Generator().manual_seed(6),
    )
    torch.testing.assert_close(door, original, atol=0, rtol=0)


def test_img2img_at_strength_0_is_z0_and_at_1_runs_every_step_from_noise():
    model, (z0, cond, _) = ToyModel(), inputs()
    assert sampling.img2img(model, z0, cond, strength=0.0, steps=10) is z0
    noise = torch.randn(z0.shape)
    full = sampling.img2img(model, z0, cond, strength=1.0, steps=10, noise=noise)
    torch.testing.assert_close(full, sampling.sample(model, cond, steps=10, x_T=noise))
    with pytest.raises(ValueError, match="strength 1.5"):
        sampling.img2img(model, z0, cond, strength=1.5, steps=10)
