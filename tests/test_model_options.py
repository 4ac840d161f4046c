"""LatentDiffusion options that must work end to end or be refused at construction: EMA under
gradient accumulation, unconditional models, conditioning keys, a trainable condition stage."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import RandomImages, fit_fixed_batch, load_config

from ldm.util import instantiate_from_config


def build(**params):
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(params)
    return instantiate_from_config(config)


def fit(model, tmp_path, n_items: int = 16, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(model, torch.utils.data.DataLoader(RandomImages(n_items), batch_size=2))
    return trainer


def test_ema_updates_once_per_optimizer_step_under_accumulation(tmp_path):
    model = build()
    trainer = fit(model, tmp_path, max_steps=2, accumulate_grad_batches=4)
    assert trainer.global_step == 2
    assert model.model_ema.num_updates.item() == 2  # not 8, once per micro-batch


def unconditional(**params):
    unet = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": dict(
            image_size=8,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            num_res_blocks=1,
            attention_resolutions=[2],
            channel_mult=[1, 2],
            num_heads=2,
        ),
    }
    return build(
        cond_stage_config="__is_unconditional__",
        conditioning_key=None,
        unet_config=unet,
        ucg_training=None,
        **params,
    )


def test_an_unconditional_latent_diffusion_model_trains_samples_and_logs_images(tmp_path):
    model = unconditional()
    trainer = fit(model, tmp_path, max_steps=2)
    assert trainer.global_step == 2
    model.eval()
    with torch.no_grad():
        latents = model.sample(None, 2, steps=3)
        assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
        images = model.log_images(
            {"image": RandomImages(2).images, "caption": ["", ""]}, n=2, steps=2
        )
    assert images["samples"].shape == (2, 3, 32, 32)
    assert images["inputs"].shape == (2, 3, 32, 32)


def test_class_label_conditioning_is_refused_outside_the_upscaler():
    with pytest.raises(NotImplementedError) as info:
        build(conditioning_key="hybrid-adm")
    assert "'hybrid-adm' is not supported" in str(info.value)


def test_a_trainable_condition_stage_must_not_be_frozen():
    with pytest.raises(ValueError, match="cond_stage_trainable.*freeze: false"):
        build(cond_stage_trainable=True)
    config = load_config("tiny/txt2img.yaml").model
    config.params.cond_stage_trainable = True
    config.params.cond_stage_config.params.freeze = False
    model = instantiate_from_config(config)
    encoder = {id(p) for p in model.cond_stage_model.parameters()}
    assert encoder and encoder <= {id(p) for p in model.trainable_parameters()}


def image_conditioned():
    """The tiny model conditioned on a second image through the first stage (the original's
    `cond_stage_config: __is_first_stage__`, `conditioning_key: concat`)."""
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(cond_stage_config="__is_first_stage__", cond_stage_key="low")
    config.params.update(conditioning_key="concat", ucg_training=None)
    unet = config.params.unet_config.params
    unet.in_channels, unet.use_spatial_transformer = 8, False  # 4 latent + 4 conditioning
    unet.pop("context_dim")
    torch.manual_seed(0)
    return instantiate_from_config(config)


def test_an_image_conditioned_model_encodes_its_condition_with_the_first_stage():
    model = image_conditioned()
    state = model.state_dict()
    first = {k[len("first_stage_model.") :] for k in state if k.startswith("first_stage_model.")}
    assert first == {k[len("cond_stage_model.") :] for k in state if k.startswith("cond_stage_")}
    images = RandomImages(4).images
    batch = {"image": images, "low": images.flip(1), "caption": [""] * 4}
    model.eval()
    z, c = model.get_input(batch)
    posterior = model.first_stage_model.encode(batch["low"].permute(0, 3, 1, 2))
    torch.testing.assert_close(c, posterior.mode())  # the original's: unscaled, the mode
    model.train()
    t, noise = torch.randint(0, 1000, (4,)), torch.randn_like(z)
    losses, _ = fit_fixed_batch(model, z, c, t, noise, steps=8, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0]
    model.eval()
    with torch.no_grad():
        previews = model.log_images(batch, n=2, steps=2)
    assert previews["samples"].shape == (2, 3, 32, 32)
