"""Mixed-device bugs without a GPU: the tiny model and its inputs on the `meta` device.

A tensor made on the CPU without `device=` meets the model's meta tensors and fails ("Tensor on
device meta is not on the expected device cpu"), just as it would meet CUDA tensors on a GPU.
Each test walks one path that a user takes on a GPU: a training step, every sampler through
the CompVis API and the sampling door, `sample()`, `log_images` and img2img.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_config

from ldm.models.diffusion import sampling
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import instantiate_from_config

META = torch.device("meta")


@pytest.fixture(scope="module")
def model():
    with META:
        return instantiate_from_config(load_config("tiny/txt2img.yaml").model).eval()


def meta_conditioning(model, n: int = 2):
    cond = model.get_learned_conditioning(["a red circle"] * n)
    uncond = model.get_learned_conditioning([""] * n)
    assert cond.device == META
    return cond, uncond


def test_a_training_step_stays_on_the_model_device(model):
    model.train()
    try:
        batch = {"image": torch.zeros(2, 32, 32, 3, device=META), "caption": ["a", "b"]}
        loss, _ = model.shared_step(batch)
    finally:
        model.eval()
    assert loss.device == META


ADAPTERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler}


@pytest.mark.parametrize("sampler", sorted(sampling.SAMPLERS))
def test_every_sampler_stays_on_the_model_device(model, sampler):
    cond, uncond = meta_conditioning(model)
    latents = sampling.sample(
        model, cond, uncond, sampler=sampler, steps=3, guidance_scale=3.0, batch_size=2
    )
    assert latents.device == META
    samples, _ = ADAPTERS[sampler](model).sample(
        S=3,
        batch_size=2,
        shape=(4, 8, 8),
        conditioning=cond,
        unconditional_guidance_scale=3.0,
        unconditional_conditioning=uncond,
        verbose=False,
    )
    assert samples.device == META


def test_sample_and_log_images_stay_on_the_model_device(model):
    cond, uncond = meta_conditioning(model)
    assert model.sample(cond, 2, steps=3, guidance_scale=2.0, uncond=uncond).device == META
    batch = {"image": torch.zeros(2, 32, 32, 3, device=META), "caption": ["a", "b"]}
    images = model.log_images(batch, n=2, steps=2)
    assert all(v.device == META for k, v in images.items() if k != "captions")


@pytest.mark.parametrize("strength_steps", [1, 2, 3])
def test_img2img_stays_on_the_model_device(model, strength_steps):
    cond, uncond = meta_conditioning(model)
    z0 = torch.zeros(2, 4, 8, 8, device=META)
    latents = sampling.img2img(
        model, z0, cond, uncond, strength=strength_steps / 3, steps=3, guidance_scale=3.0
    )
    assert latents.device == META
