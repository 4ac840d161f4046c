"""SD 2's x4 latent upscaler: the original layout and diffusers' converters, the low-res data,
get_input's conditioning, training, guidance with a fixed noise level, and upscale.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    diffusers_original_config,
    fit_fixed_batch,
    load_config,
    short_run,
    with_live_zero_layers,
)
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from PIL import Image
from test_ddpm import assert_fits
from torch.utils.data import default_collate

import main
from ldm.checkpoint import save_checkpoint
from ldm.data.lowres import LowResolution
from ldm.models.diffusion import guidance
from ldm.modules.diffusionmodules.upscaling import BUFFER_NAMES
from ldm.util import ConfigError, instantiate_from_config
from scripts import upscale

FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
LABEL_EMB = "model.diffusion_model.label_emb.weight"
SHAPES = {"target": "ldm.data.synthetic.SyntheticShapes", "params": {"size": 32, "seed": 3}}


# ---------------------------------------------------------------- the full-size layout


def test_full_size_x4_upscaler_is_the_original_layout_that_diffusers_converts():
    config = load_config("stable-diffusion/x4-upscaling.yaml").model
    with torch.device("meta"):
        model = instantiate_from_config(config)
    checkpoint = model.state_dict()
    assert sfu.infer_diffusers_model_type(checkpoint) == "upscale"
    assert tuple(checkpoint[LABEL_EMB].shape) == (1000, 1024)  # (num_classes, 4 * 256)
    assert tuple(checkpoint[FIRST_CONV].shape) == (256, 7, 3, 3)  # 4 latent + 3 image channels
    low_scale = {k for k in checkpoint if k.startswith("low_scale_model.")}
    assert low_scale == {f"low_scale_model.{name}" for name in BUFFER_NAMES}
    assert checkpoint["low_scale_model.betas"].shape == (1000,)
    original = diffusers_original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    assert unet_config["in_channels"] == 7 and unet_config["num_class_embeds"] == 1000
    assert unet_config["only_cross_attention"] == [True, True, True, False]
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint)
    assert vae_config["scaling_factor"] == 0.08333
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = DiffusersAutoencoderKL(**vae_config)
    assert_fits(unet, sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config))
    assert_fits(vae, sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config))


# ---------------------------------------------------------------- low-res data


def test_low_resolution_items_add_the_area_downsampled_image():
    item = LowResolution(SHAPES, factor=4, key="lr")[5]
    image, low_res = item["image"], item["lr"]
    assert low_res.shape == (8, 8, 3) and low_res.dtype == np.float32
    np.testing.assert_allclose(low_res[2, 3], image[8:12, 12:16].mean(axis=(0, 1)), atol=1e-6)
    assert {"image", "caption", "color"} <= set(item)
    with pytest.raises(ValueError, match="32x32 px, not a multiple of factor 3"):
        LowResolution(SHAPES, factor=3)[0]
    with pytest.raises(ConfigError, match="factor 0 must be a positive integer"):
        LowResolution(SHAPES, factor=0)


# ---------------------------------------------------------------- the tiny model


def tiny_config():
    return load_config("tiny/upscaling.yaml")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return instantiate_from_config(tiny_config().model)


def batch_of(n: int, factor: int = 4) -> dict:
    data = LowResolution(SHAPES, factor=factor, key="lr")
    return default_collate([data[i] for i in range(n)])


def test_get_input_feeds_the_noised_low_res_image_and_its_noise_level(model, monkeypatch):
    model.eval()
    batch = batch_of(2)
    z, cond = model.get_input(batch)
    (c_concat,), (context,), levels = cond["c_concat"], cond["c_crossattn"], cond["c_adm"]
    assert z.shape == (2, 4, 8, 8) and c_concat.shape == (2, 3, 8, 8)
    assert context.shape == (2, 77, 32)
    assert levels.shape == (2,) and levels.dtype == torch.long
    assert 0 <= levels.min() and levels.max() < 350  # random, below max_noise_level
    monkeypatch.setattr(model, "noise_level_key", "noise_level")
    batch["noise_level"] = torch.tensor([0, 349])
    _, cond = model.get_input(batch)
    assert cond["c_adm"].tolist() == [0, 349]
    low_res = batch["lr"].permute(0, 3, 1, 2)
    torch.testing.assert_close(cond["c_concat"][0][0], low_res[0], atol=0.05, rtol=0)  # level 0
    a = model.low_scale_model.alphas_cumprod[349]
    assert (cond["c_concat"][0][1] - a.sqrt() * low_res[1]).std() > 0.5  # mostly noise
    batch["noise_level"] = torch.tensor([3, 351])
    with pytest.raises(ValueError, match=r"batch key 'noise_level'.*351 is outside \[0, 350\]"):
        model.get_input(batch)


def test_a_low_res_batch_off_the_latent_grid_is_refused_naming_the_sizes(model):
    with pytest.raises(
        ValueError,
        match=r"batch key 'lr': the low-res images are 16x16 px, but the 32x32 images' latents "
        r"are 8x8.*the image's size / 4",
    ):
        model.get_input(batch_of(2, factor=2))


def test_the_low_scale_model_stays_frozen_and_its_buffers_may_be_missing(model, tmp_path):
    model.train()
    assert not model.low_scale_model.training and model.model.training
    assert not any(p.requires_grad for p in model.low_scale_model.parameters())
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("low_scale_model")}
    save_checkpoint(weights, tmp_path / "without-low-scale.ckpt")
    betas = model.low_scale_model.betas.clone()
    model.init_from_ckpt(tmp_path / "without-low-scale.ckpt")  # computed from the config
    torch.testing.assert_close(model.low_scale_model.betas, betas)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(model):
    model.train()
    z, cond = model.get_input(batch_of(8))
    t, noise = torch.randint(0, 1000, (8,)), torch.randn_like(z)
    losses, _ = fit_fixed_batch(model, z, cond, t, noise, steps=8, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_upscale_conditions_fix_the_noise_level_and_guidance_at_1_is_conditional(model):
    model.eval()
    with_live_zero_layers(model.model)
    low_res = batch_of(2)["lr"].permute(0, 3, 1, 2)
    context = model.get_learned_conditioning(["a red circle on a blue background"] * 2)
    empty = model.get_learned_conditioning(["", ""])
    cond, uncond = model.upscale_conditions(low_res, context, 20, empty)
    assert cond["c_adm"].tolist() == [20, 20] and uncond["c_adm"] is cond["c_adm"]
    assert uncond["c_concat"][0] is cond["c_concat"][0]  # one noised image for both
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        guided = guidance.cfg_eps_fn(model, cond, uncond, 1.0)(x_t, t)
        prediction = model.apply_model(x_t, t, cond)
        direct = guidance.eps_from_prediction("v", x_t, t, prediction, model.alphas_cumprod)
        stronger = guidance.cfg_eps_fn(model, cond, uncond, 4.0)(x_t, t)
    torch.testing.assert_close(guided, direct)
    assert not torch.allclose(stronger, direct)  # the text part is what guidance changes
    with pytest.raises(ValueError, match=r"noise_level: noise level 351 is outside \[0, 350\]"):
        model.upscale_conditions(low_res, context, 351, empty)


def test_log_images_show_inputs_low_res_inputs_and_upscales(model):
    model.eval()
    images = model.log_images(batch_of(2), n=2, steps=2)
    assert len(images.pop("captions")) == 2
    assert {k: tuple(v.shape) for k, v in images.items()} == {
        "inputs": (2, 3, 32, 32),
        "low_res_inputs": (2, 3, 8, 8),
        "samples_cfg1": (2, 3, 32, 32),
        "samples_cfg3": (2, 3, 32, 32),
    }


def test_an_unnoised_low_scale_model_and_a_trainable_text_encoder():
    config = tiny_config().model
    config.params.low_scale_config = {
        "target": "ldm.modules.diffusionmodules.upscaling.SimpleImageConcat"
    }
    plain = instantiate_from_config(config).eval()
    batch = batch_of(2)
    _, cond = plain.get_input(batch)
    assert cond["c_adm"].tolist() == [0, 0]
    torch.testing.assert_close(cond["c_concat"][0], batch["lr"].permute(0, 3, 1, 2))
    assert plain.upscale_conditions(cond["c_concat"][0], cond["c_crossattn"][0], 0)[1] is None
    with pytest.raises(ValueError, match=r"noise level 20 is outside \[0, 0\]"):
        plain.upscale_conditions(cond["c_concat"][0], cond["c_crossattn"][0], 20)
    config = tiny_config().model
    config.params.cond_stage_trainable = True
    config.params.cond_stage_config.params.freeze = False
    with pytest.raises(ConfigError, match="the text encoder must be frozen"):
        instantiate_from_config(config)


# ---------------------------------------------------------------- upscale.py


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A main.py log dir of the tiny upscaler after two steps."""
    return short_run(tmp_path_factory.mktemp("upscaling-run"), "upscaling.yaml")


FAST = ["--ddim_steps", "2", "--precision", "full", "--device", "cpu", "--prompt", "a red circle"]


def write_image(path: Path, width: int, height: int) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_upscale_py_writes_images_the_latent_factor_times_the_input(run, tmp_path):
    image = write_image(tmp_path / "low.png", 8, 8)
    outdir = tmp_path / "out"
    flags = ["--init-img", str(image), "--ckpt", str(run), "--outdir", str(outdir), *FAST]
    (samples,) = upscale.main([*flags, "--n_samples", "2", "--noise_level", "50"])
    assert samples.shape == (2, 3, 32, 32)
    assert sorted(p.name for p in (outdir / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert Image.open(outdir / "samples" / "00001.png").size == (32, 32)
    assert (outdir / "grid-0000.png").is_file()
    odd = write_image(tmp_path / "odd.png", 11, 6)  # cut to 10 x 6 (the tiny UNet's multiple 2)
    (samples,) = upscale.main(["--init-img", str(odd), "--ckpt", str(run), *FAST, "--skip_save"])
    assert samples.shape == (1, 3, 24, 40)


def test_upscale_py_refuses_a_text_to_image_model_and_a_noise_level_out_of_range(run, tmp_path):
    image = str(write_image(tmp_path / "low.png", 8, 8))
    with pytest.raises(SystemExit, match=r"--noise_level: noise level 400 is outside \[0, 350\]"):
        upscale.main(["--init-img", image, "--ckpt", str(run), "--noise_level", "400", *FAST])
    text_to_image = instantiate_from_config(load_config("tiny/txt2img.yaml").model)
    save_checkpoint(text_to_image.state_dict(), tmp_path / "t2i.ckpt")
    config = str(ROOT / "configs" / "tiny" / "txt2img.yaml")
    with pytest.raises(SystemExit, match=r"takes 4 input channels\), not an upscaler"):
        upscale.main(
            ["--init-img", image, "--ckpt", str(tmp_path / "t2i.ckpt"), "--config", config] + FAST
        )


def test_the_upscaling_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    from scripts import demo_upscale

    ae = main.main(
        ["--base", str(ROOT / "configs/tiny/autoencoder.yaml"), "-t", "--no-test"]
        + ["-l", str(tmp_path / "ae"), "--max_steps", "2", "data.params.batch_size=4"]
        + ["data.params.num_workers=0", "lightning.trainer.limit_val_batches=1"]
    )
    result = demo_upscale.main(
        ["--autoencoder_run", str(ae.default_root_dir), "--outdir", str(tmp_path / "out")]
        + ["--logdir", str(tmp_path / "logs"), "--steps", "2", "--n_per_prompt", "1"]
        + ["--eval_steps", "2"]
    )
    assert {"color", "shape", "background", "psnr_db"} <= set(result["upscaler"])
    assert result["originals"]["all"] == 1.0  # the judge reads the originals right
    assert result["n_images"] == 24 and (tmp_path / "out" / "upscale.png").is_file()
