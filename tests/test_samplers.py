"""Samplers: step-for-step parity with diffusers, convergence on an analytic model, guidance."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from sampler_fakes import SD_BETAS, FakeModel, T, sd_betas, toy_eps

from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import sample_ddim
from ldm.models.diffusion.dpm_solver import sample_dpmpp_2m
from ldm.models.diffusion.guidance import cfg_eps_fn, model_eps_fn
from ldm.models.diffusion.plms import plms_eps, sample_plms
from ldm.models.diffusion.schedule import make_ddim_timesteps


def step_outputs(run) -> list[dict]:
    """The callback dicts of one sampler run."""
    steps = []
    run(steps.append)
    return steps


# --- timesteps ---------------------------------------------------------------------------------


def test_timesteps_match_the_original_and_diffusers():
    original_uniform = torch.arange(0, T, T // 50).flip(0) + 1  # range(0, T, c) + 1, descending
    assert torch.equal(make_ddim_timesteps(50, T, "uniform"), original_uniform)
    assert torch.equal(make_ddim_timesteps(50, T, "leading"), original_uniform)
    assert len(make_ddim_timesteps(30, T, "uniform")) == 31  # the original's extra step
    for spacing in ("leading", "trailing"):
        ddim = DDIMScheduler(**SD_BETAS, steps_offset=1, timestep_spacing=spacing)
        ddim.set_timesteps(30)
        assert torch.equal(make_ddim_timesteps(30, T, spacing), ddim.timesteps)
    dpm = DPMSolverMultistepScheduler(**SD_BETAS, timestep_spacing="linspace")
    dpm.set_timesteps(20)
    assert torch.equal(make_ddim_timesteps(20, T, "linspace"), dpm.timesteps)
    assert make_ddim_timesteps(10, T, "quad")[-1] == 1
    assert make_ddim_timesteps(3, T, "uniform").tolist() == [667, 334, 1]  # the original: 1000
    with pytest.raises(ValueError, match="reaches t = 1000"):
        make_ddim_timesteps(T, T, "leading")
    with pytest.raises(ValueError, match="'cubic'"):
        make_ddim_timesteps(10, T, "cubic")


def test_sd_schedule_matches_diffusers():
    ours = schedule.schedule_buffers(sd_betas())["alphas_cumprod"].float()
    torch.testing.assert_close(ours, DDIMScheduler(**SD_BETAS).alphas_cumprod, atol=1e-6, rtol=0)


# --- step-for-step parity with diffusers --------------------------------------------------------


@pytest.mark.parametrize("eta,alpha_to_one", [(0.0, False), (0.7, False), (0.0, True)])
def test_ddim_matches_diffusers_step_for_step(eta, alpha_to_one):
    ref = DDIMScheduler(
        **SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=alpha_to_one,
        steps_offset=1,
        timestep_spacing="leading",
    )
    ref.set_timesteps(20)
    timesteps, ac = make_ddim_timesteps(20, T, "leading"), ref.alphas_cumprod
    assert torch.equal(timesteps, ref.timesteps)
    x_T, final_alpha = torch.randn(2, 4, 8, 8), 1.0 if alpha_to_one else None
    steps = step_outputs(
        lambda cb: sample_ddim(
            toy_eps,
            x_T,
            timesteps,
            ac,
            eta=eta,
            final_alpha=final_alpha,
            generator=torch.Generator().manual_seed(1),
            callback=cb,
        )
    )
    x, generator = x_T, torch.Generator().manual_seed(1)  # the same noise, drawn in step order
    for t, step in zip(ref.timesteps, steps, strict=True):
        noise = torch.randn(x.shape, generator=generator) if eta > 0 else None
        out = ref.step(toy_eps(x, t.expand(2)), t, x, eta=eta, variance_noise=noise)
        torch.testing.assert_close(step["x0"], out.pred_original_sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(step["x"], out.prev_sample, atol=1e-5, rtol=0)
        x = out.prev_sample


@pytest.mark.parametrize("steps,final", [(10, "sigma_min"), (20, "sigma_min"), (20, "zero")])
def test_dpmpp_2m_matches_diffusers_step_for_step(steps, final):
    ref = DPMSolverMultistepScheduler(
        **SD_BETAS,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type=final,
        timestep_spacing="linspace",
    )
    ref.set_timesteps(steps)
    timesteps = make_ddim_timesteps(steps, T, "linspace")
    assert torch.equal(timesteps, ref.timesteps)
    x_T, final_alpha = torch.randn(2, 4, 8, 8), 1.0 if final == "zero" else None
    ours = step_outputs(
        lambda cb: sample_dpmpp_2m(
            toy_eps, x_T, timesteps, ref.alphas_cumprod, final_alpha=final_alpha, callback=cb
        )
    )
    x = x_T
    for t, step in zip(ref.timesteps, ours, strict=True):
        x = ref.step(toy_eps(x, t.expand(2)), t, x).prev_sample
        torch.testing.assert_close(step["x"], x, atol=1e-5, rtol=0)


def test_plms_matches_diffusers_pndm_step_for_step():
    # PNDM with skip_prk_steps repeats the second timestep: its calls 0 and 1 are the original's
    # pseudo improved Euler step (two model calls), then one call per step.
    ref = PNDMScheduler(
        **SD_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    ref.set_timesteps(20)
    timesteps = make_ddim_timesteps(20, T, "uniform")
    assert torch.equal(timesteps, ref.timesteps.unique_consecutive())
    x_T = torch.randn(2, 4, 8, 8)
    ours = step_outputs(
        lambda cb: sample_plms(toy_eps, x_T, timesteps, ref.alphas_cumprod, callback=cb)
    )
    x, reference = x_T, []
    for t in ref.timesteps:
        x = ref.step(toy_eps(x, t.expand(2)), t, x).prev_sample
        reference.append(x)
    for step, expected in zip(ours, reference[1:], strict=True):
        torch.testing.assert_close(step["x"], expected, atol=1e-5, rtol=0)


def test_plms_eps_is_the_adams_bashforth_combination():
    e1, e2, e3, e4, e_next = torch.randn(5, 3)
    torch.testing.assert_close(plms_eps(e1, [], e_next), (e1 + e_next) / 2)
    torch.testing.assert_close(plms_eps(e1, [e2]), 1.5 * e1 - 0.5 * e2)
    torch.testing.assert_close(plms_eps(e1, [e3, e2]), (23 * e1 - 16 * e2 + 5 * e3) / 12)
    expected = (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4) / 24
    torch.testing.assert_close(plms_eps(e1, [e4, e3, e2]), expected)


def test_ddim_with_eta_1_over_all_steps_is_ddpm_ancestral_sampling():
    buffers = {k: v.float() for k, v in schedule.schedule_buffers(sd_betas()).items()}
    ac, x_T = buffers["alphas_cumprod"], torch.randn(2, 4, 8, 8)
    steps = step_outputs(
        lambda cb: sample_ddim(
            toy_eps,
            x_T,
            torch.arange(T - 1, -1, -1),
            ac,
            eta=1.0,
            final_alpha=1.0,
            generator=torch.Generator().manual_seed(2),
            callback=cb,
        )
    )
    x, generator = x_T, torch.Generator().manual_seed(2)
    for step in steps:  # Ho et al. 2020, eq. 6-7, fed the same input and noise as each step
        t = torch.full((2,), step["t"])
        x0 = schedule.x0_from_eps(x, t, toy_eps(x, t), ac)
        mean = (
            buffers["posterior_mean_coef1"][t[0]] * x0 + buffers["posterior_mean_coef2"][t[0]] * x
        )
        noise = torch.randn(x.shape, generator=generator)
        expected = mean + buffers["posterior_variance"][t[0]].sqrt() * noise
        torch.testing.assert_close(step["x"], expected, atol=1e-5, rtol=0)
        x = step["x"]


# --- the analytic Gaussian model ----------------------------------------------------------------

MU, S = 0.5, 0.5  # data x0 ~ N(MU, S^2) per element


def gaussian_variance(a: torch.Tensor) -> torch.Tensor:
    return a * S**2 + 1 - a


def optimal_eps_fn(ac: torch.Tensor):
    """E[eps | x_t] for Gaussian data: the best possible eps network."""

    def eps_fn(x, t):
        a = ac[t].reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / gaussian_variance(a)

    return eps_fn


def flow_error(sampler, steps: int, spacing: str) -> float:
    """Relative error against the exact probability-flow map between the sampler's own levels."""
    ac = schedule.schedule_buffers(sd_betas())["alphas_cumprod"]  # float64
    timesteps = make_ddim_timesteps(steps, T, spacing)
    x_T = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a_start, a_end = ac[timesteps[0]], ac[0]  # every sampler here ends at alphas_cumprod[0]
    scale = (gaussian_variance(a_end) / gaussian_variance(a_start)).sqrt()
    exact = a_end.sqrt() * MU + scale * (x_T - a_start.sqrt() * MU)
    x = sampler(optimal_eps_fn(ac), x_T, timesteps, ac)
    return ((x - exact).norm() / exact.norm()).item()


# Relative error bounds at 100 steps, each on its SD grid; observed: DDIM 1.9e-2 (first order),
# PLMS 1.3e-4, DPM-Solver++(2M) 1.3e-2.
CONVERGENCE = {
    "ddim": (sample_ddim, "uniform", 2.5e-2),
    "plms": (sample_plms, "uniform", 1e-3),
    "dpmpp_2m": (sample_dpmpp_2m, "linspace", 2e-2),
}


@pytest.mark.parametrize("name", CONVERGENCE)
def test_deterministic_samplers_converge_to_the_probability_flow(name):
    sampler, spacing, bound = CONVERGENCE[name]
    coarse, fine = flow_error(sampler, 10, spacing), flow_error(sampler, 100, spacing)
    assert fine < coarse / 5
    assert fine < bound


@pytest.mark.parametrize("spacing", ["uniform", "linspace"])
def test_dpmpp_2m_converges_faster_than_ddim(spacing):
    # Not at every count: at 20 "linspace" steps its second-order last step, one large step in
    # lambda at the low-noise end, loses to DDIM on this model (as diffusers' does).
    for steps in (100, 250):
        dpm, ddim = (
            flow_error(sample_dpmpp_2m, steps, spacing),
            flow_error(sample_ddim, steps, spacing),
        )
        assert dpm < 0.7 * ddim


# --- guidance and parameterization -------------------------------------------------------------

CONDS = {
    "tensor": lambda b: torch.randn(b, 3, 5),
    "crossattn": lambda b: {"c_crossattn": [torch.randn(b, 3, 5)]},
}


@pytest.mark.parametrize("kind", CONDS)
def test_cfg_batches_uncond_and_cond_into_one_call(kind):
    model, x, t = FakeModel(), torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    cond, uncond = CONDS[kind](2), CONDS[kind](2)
    eps_c, eps_u = model_eps_fn(model, cond)(x, t), model_eps_fn(model, uncond)(x, t)
    torch.testing.assert_close(cfg_eps_fn(model, cond, uncond, 1.0)(x, t), eps_c, atol=0, rtol=0)
    model.calls = 0
    guided = cfg_eps_fn(model, cond, uncond, 7.5)(x, t)
    assert model.calls == 1
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u))


class HybridModel:
    """A real UNet behind DiffusionWrapper with hybrid conditioning (concat + cross-attention),
    counting its calls: what the samplers see of SD's inpainting model."""

    num_timesteps, device, parameterization = T, torch.device("cpu"), "eps"

    def __init__(self):
        from ldm.models.diffusion.ddpm import DiffusionWrapper

        params = dict(
            image_size=8,
            in_channels=6,
            out_channels=4,
            model_channels=32,
            num_res_blocks=1,
            attention_resolutions=[1],
            channel_mult=[1],
            num_heads=2,
            use_spatial_transformer=True,
            context_dim=5,
        )
        unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}
        self.wrapper, self.calls = DiffusionWrapper(unet, "hybrid").eval(), 0
        self.alphas_cumprod = FakeModel().alphas_cumprod

    def apply_model(self, x_t, t, cond):
        self.calls += 1
        return self.wrapper(x_t, t, **cond)


@torch.no_grad()
def test_cfg_batches_hybrid_conditioning_through_the_real_wrapper():
    model, x, t = HybridModel(), torch.randn(2, 4, 8, 8), torch.tensor([500, 20])

    def cond() -> dict:
        return {"c_concat": [torch.randn(2, 2, 8, 8)], "c_crossattn": [torch.randn(2, 3, 5)]}

    c, u = cond(), cond()
    unet = model.wrapper.diffusion_model  # the reference: each half through the UNet alone
    eps_c = unet(torch.cat([x, *c["c_concat"]], 1), t, context=c["c_crossattn"][0])
    eps_u = unet(torch.cat([x, *u["c_concat"]], 1), t, context=u["c_crossattn"][0])
    torch.testing.assert_close(model_eps_fn(model, c)(x, t), eps_c)
    model.calls = 0
    guided = cfg_eps_fn(model, c, u, 7.5)(x, t)
    assert model.calls == 1
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_model_eps_fn_converts_x0_and_v_predictions_to_eps(parameterization):
    model, x, t = FakeModel(parameterization), torch.randn(2, 4, 8, 8), torch.tensor([999, 3])
    cond, uncond = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    torch.testing.assert_close(model_eps_fn(model, cond)(x, t), model.true_eps(x, t, cond))
    eps_c, eps_u = model.true_eps(x, t, cond), model.true_eps(x, t, uncond)
    guided = cfg_eps_fn(model, cond, uncond, 3.0)(x, t)
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u))
