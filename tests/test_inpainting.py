"""SD's inpainting models: the original layouts, diffusers parity, masks, fine-tuning a
text-to-image file into one, training, guidance with hybrid conditioning, and inpaint.py."""

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
    sd_manifest,
    short_run,
    with_live_zero_layers,
)
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from PIL import Image
from test_ddpm import assert_fits, shapes
from test_unet import randomize, to_diffusers
from torch.utils.data import default_collate

import main
from ldm.checkpoint import save_checkpoint
from ldm.data.inpainting import InpaintingMasks, random_mask
from ldm.models.diffusion import guidance
from ldm.util import instantiate_from_config
from scripts import inpaint

FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
CONFIGS = {"v1": "v1-inpainting-inference.yaml", "v2": "v2-inpainting-inference.yaml"}


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_inpainting_models_have_sd_keys_and_9_input_channels(version):
    config = load_config(f"stable-diffusion/{CONFIGS[version]}").model
    with torch.device("meta"):
        model = instantiate_from_config(config)
    checkpoint = model.state_dict()
    ours, expected = shapes(checkpoint), dict(sd_manifest(version))
    assert expected[FIRST_CONV] == (320, 4, 3, 3)
    expected[FIRST_CONV] = (320, 9, 3, 3)
    assert ours == expected
    assert (
        sfu.infer_diffusers_model_type(checkpoint)
        == {
            "v1": "inpainting",
            "v2": "inpainting_v2",
        }[version]
    )
    original = diffusers_original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    assert unet_config["in_channels"] == 9
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    assert_fits(unet, sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config))


def tiny_config():
    return load_config("tiny/inpainting.yaml")


def test_the_tiny_inpainting_unet_matches_diffusers_with_9_channels():
    config = tiny_config().model
    unet = randomize(instantiate_from_config(config.params.unet_config)).eval()
    reference = to_diffusers(config, unet)
    assert reference.config.in_channels == 9
    x, t, context = torch.randn(2, 9, 8, 8), torch.tensor([3, 917]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ours = unet(x, t, context=context)
        theirs = reference(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- masks


def test_random_masks_are_strokes_boxes_or_everything_in_the_recipes_share():
    np.random.seed(0)
    masks = [random_mask(32, 32, 0.25) for _ in range(400)]
    assert all(m.shape == (32, 32, 1) and set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    full = sum(m.min() == 1 for m in masks)
    assert 70 < full < 130  # 25 % of 400
    partial = [m.mean() for m in masks if m.min() < 1]
    assert min(partial) > 0 and max(partial) < 1


def test_inpainting_items_blank_the_masked_part_and_use_a_mask_file(tmp_path):
    synthetic = {"target": "ldm.data.synthetic.SyntheticShapes", "params": {"size": 32}}
    item = InpaintingMasks(synthetic, full_mask_p=0.0)[3]
    mask = item["mask"]
    np.testing.assert_array_equal(item["masked_image"], item["image"] * (1 - mask))
    assert 0 < mask.mean() < 1
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red")
    own = np.zeros((32, 32), np.uint8)
    own[:, 16:] = 255  # paint the right half
    Image.fromarray(own).save(tmp_path / "a.mask.png")
    folder = {
        "target": "ldm.data.folder.ImageCaptionFolder",
        "params": {"root": str(tmp_path), "size": 32, "masks": "file"},
    }
    item = InpaintingMasks(folder)[0]
    assert item["mask"][:, :16].max() == 0 and item["mask"][:, 16:].min() == 1
    assert "loss_mask" not in item


# ---------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return instantiate_from_config(tiny_config().model)


def batch_of(n: int, seed: int = 0) -> dict:
    data = instantiate_from_config(tiny_config().data.params.train)
    return default_collate([data[i] for i in range(seed, seed + n)])


def test_get_input_feeds_the_mask_and_the_masked_images_latent(model):
    batch = batch_of(2)
    model.eval()
    torch.manual_seed(5)
    z, cond = model.get_input(batch)
    (c_concat,), (context,) = cond["c_concat"], cond["c_crossattn"]
    assert z.shape == (2, 4, 8, 8) and c_concat.shape == (2, 5, 8, 8) and context.shape[0] == 2
    mask = torch.nn.functional.interpolate(batch["mask"].permute(0, 3, 1, 2), size=(8, 8))
    torch.testing.assert_close(c_concat[:, :1], mask)  # first the mask, nearest-resized
    torch.manual_seed(5)  # the same latent samples: the image's, then the masked image's
    encode = model.first_stage_model.encode
    # contiguous (B, 3, H, W) as the model's: a fully masked item's all-zero image makes the
    # encoder's GroupNorms amplify rounding, which depends on the memory layout
    image_latent = encode(model.batch_images(batch)).sample() * model.scale_factor
    masked_latent = encode(model.batch_images(batch, "masked_image")).sample()
    torch.testing.assert_close(z, image_latent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        c_concat[:, 1:], masked_latent * model.scale_factor, atol=1e-4, rtol=1e-4
    )


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(model):
    batch = batch_of(8)
    model.train()
    z, cond = model.get_input(batch)
    t, noise = torch.randint(0, 1000, (8,)), torch.randn_like(z)
    losses, _ = fit_fixed_batch(model, z, cond, t, noise, steps=8, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_guidance_at_scale_1_is_the_conditional_prediction(model):
    with_live_zero_layers(model.model)  # a fresh UNet predicts 0 whatever the text
    model.eval()
    z, cond = model.get_input(batch_of(2))
    uncond = {**cond, "c_crossattn": [model.get_learned_conditioning(["", ""])]}
    x_t, t = torch.randn_like(z), torch.tensor([10, 500])
    with torch.no_grad():
        guided = guidance.cfg_eps_fn(model, cond, uncond, 1.0)(x_t, t)
        direct = guidance.eps_from_prediction(
            model.parameterization, x_t, t, model.apply_model(x_t, t, cond), model.alphas_cumprod
        )
        stronger = guidance.cfg_eps_fn(model, cond, uncond, 4.0)(x_t, t)
    torch.testing.assert_close(guided, direct)
    assert not torch.allclose(stronger, direct)  # the text part is what guidance changes


def test_a_text_to_image_file_becomes_an_inpainting_model_that_starts_as_it(tmp_path):
    torch.manual_seed(0)
    text_to_image = instantiate_from_config(load_config("tiny/txt2img.yaml").model).eval()
    randomize(text_to_image.model)
    path = tmp_path / "t2i.ckpt"
    save_checkpoint(text_to_image.state_dict(), path)
    config = tiny_config().model
    config.params.ckpt_path = str(path)
    inpainter = instantiate_from_config(config).eval()
    weight = inpainter.state_dict()[FIRST_CONV]
    torch.testing.assert_close(weight[:, :4], text_to_image.state_dict()[FIRST_CONV])
    assert weight[:, 4:].abs().max() == 0
    z, cond = inpainter.get_input(batch_of(2))
    t = torch.tensor([5, 600])
    with torch.no_grad():
        ours = inpainter.apply_model(z, t, cond)
        theirs = text_to_image.apply_model(z, t, cond["c_crossattn"][0])
    torch.testing.assert_close(ours, theirs)  # the new channels start at zero


# ---------------------------------------------------------------- inpaint.py


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A main.py log dir of the tiny inpainting model after two steps."""
    return short_run(tmp_path_factory.mktemp("inpainting-run"), "inpainting.yaml")


def write_pair(indir: Path, name: str = "shape", mask_size=(32, 32)) -> np.ndarray:
    indir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), np.uint8)
    Image.fromarray(image).save(indir / f"{name}.png")
    mask = np.zeros(mask_size[::-1], np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(indir / f"{name}_mask.png")
    return image


FAST = ["--steps", "2", "--precision", "full", "--device", "cpu", "--prompt", "a red circle"]


def test_inpaint_py_paints_the_mask_and_pastes_the_rest_when_asked(run, tmp_path):
    image = write_pair(tmp_path / "in")
    flags = ["--indir", str(tmp_path / "in"), "--ckpt", str(run), *FAST]
    plain = inpaint.main([*flags, "--outdir", str(tmp_path / "plain"), "--n_samples", "2"])
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["shape-1.png", "shape.png"]
    assert plain[0].shape == (2, 3, 32, 32)
    inpaint.main([*flags, "--outdir", str(tmp_path / "pasted"), "--paste"])
    pasted = np.asarray(Image.open(tmp_path / "pasted" / "shape.png"))
    kept = np.ones((32, 32), bool)
    kept[8:24, 8:24] = False
    np.testing.assert_array_equal(pasted[kept], image[kept])  # exactly, outside the mask
    unpasted = np.asarray(Image.open(tmp_path / "plain" / "shape.png"))
    assert (unpasted[kept] != image[kept]).any()  # through the autoencoder otherwise


def test_inpaint_py_names_a_missing_mask_a_wrong_size_and_a_text_to_image_model(
    run, tmp_path, capsys
):
    indir = tmp_path / "in"
    write_pair(indir)
    Image.new("RGB", (32, 32)).save(indir / "lonely.png")
    with pytest.raises(SystemExit, match="no _mask.png mask for lonely.png"):
        inpaint.main(["--indir", str(indir), "--ckpt", str(run), *FAST])
    (indir / "lonely.png").unlink()
    write_pair(indir, "odd", mask_size=(24, 32))
    with pytest.raises(SystemExit, match="odd_mask.png is 24x32 but odd.png is 32x32"):
        inpaint.main(["--indir", str(indir), "--ckpt", str(run), *FAST])
    (indir / "odd.png").unlink()
    (indir / "odd_mask.png").unlink()
    text_to_image = instantiate_from_config(load_config("tiny/txt2img.yaml").model)
    save_checkpoint(text_to_image.state_dict(), tmp_path / "t2i.ckpt")
    config = str(ROOT / "configs" / "tiny" / "txt2img.yaml")
    with pytest.raises(SystemExit, match=r"takes 4 input channels\), not an inpainting model"):
        inpaint.main(
            ["--indir", str(indir), "--ckpt", str(tmp_path / "t2i.ckpt"), "--config", config] + FAST
        )


def test_the_inpainting_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    from scripts import demo_inpainting

    base = main.main(
        ["--base", str(ROOT / "configs/tiny/txt2img.yaml"), "-t", "--no-test"]
        + ["-l", str(tmp_path / "base"), "--max_steps", "2", "data.params.batch_size=4"]
        + ["data.params.num_workers=0", "lightning.trainer.limit_val_batches=1"]
    )
    result = demo_inpainting.main(
        ["--base_run", str(base.default_root_dir), "--outdir", str(tmp_path / "out")]
        + ["--logdir", str(tmp_path / "logs"), "--steps", "2", "--n_per_prompt", "1"]
        + ["--eval_steps", "2"]
    )
    assert set(result["autoencoder_ceiling"]) == {"outside_mean_abs_diff", "outside_kept"}
    for name in ("before_fine_tuning", "fine_tuned"):
        assert {"color", "shape", "background", "outside_kept"} <= set(result[name])
        assert result[name]["n_images"] == 24
    assert (tmp_path / "out" / "inpainting.png").is_file()
    assert (tmp_path / "out" / "inpainting.json").is_file()
