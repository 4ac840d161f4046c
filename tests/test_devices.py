"""Mixed-device bugs without a GPU: the tiny model and its inputs on the `meta` device.

A tensor made on the CPU without `device=` meets the model's meta tensors and fails ("Tensor on
device meta is not on the expected device cpu"), just as it would meet CUDA tensors on a GPU.
Each test walks one path that a user takes on a GPU: a training step, every sampler through
the CompVis API, `sample()`, `log_images` and img2img's redraw.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_config

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import instantiate_from_config
from scripts import img2img, txt2img

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


@pytest.mark.parametrize("sampler", sorted(txt2img.SAMPLERS))
def test_every_sampler_stays_on_the_model_device(model, sampler):
    cond, uncond = meta_conditioning(model)
    samples, _ = txt2img.SAMPLERS[sampler](model).sample(
        S=3, batch_size=2, shape=(4, 8, 8), conditioning=cond,
        unconditional_guidance_scale=3.0, unconditional_conditioning=uncond, verbose=False,
    )  # fmt: skip
    assert samples.device == META


def test_sample_and_log_images_stay_on_the_model_device(model):
    cond, uncond = meta_conditioning(model)
    assert model.sample(cond, 2, steps=3, guidance_scale=2.0, uncond=uncond).device == META
    batch = {"image": torch.zeros(2, 32, 32, 3, device=META), "caption": ["a", "b"]}
    images = model.log_images(batch, n=2, steps=2)
    assert all(v.device == META for k, v in images.items() if k != "captions")


@pytest.mark.parametrize("strength_steps", [1, 2, 3])
def test_img2img_redraw_stays_on_the_model_device(model, strength_steps):
    cond, uncond = meta_conditioning(model)
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=3, verbose=False)
    z0 = torch.zeros(2, 4, 8, 8, device=META)
    latents = img2img.redraw(model, sampler, z0, strength_steps, 3, (cond, uncond, 3.0, 0.0))
    assert latents.device == META
