"""AutoencoderKL: SD key layout, parity with diffusers' AutoencoderKL, posterior, training."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import diffusers_original_config, load_config, sd_manifest
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)

from ldm.checkpoint import save_checkpoint
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

PREFIX = "first_stage_model."


def tiny_config(**ddconfig):
    config = load_config("tiny/txt2img.yaml").model
    config.params.first_stage_config.params.ddconfig.update(ddconfig)
    return config


def build(config):
    return instantiate_from_config(config.params.first_stage_config)


def test_full_size_keys_match_sd():
    config = load_config("stable-diffusion/v1-inference.yaml").model
    with torch.device("meta"):
        model = build(config)
    ours = {PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v for k, v in sd_manifest("v1").items() if k.startswith(PREFIX)}


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def test_tiny_autoencoder_matches_diffusers():
    """Attention at the lowest resolution (mid block) included; SD has none in the levels."""
    config = tiny_config()
    ours = randomize(build(config))
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    diffusers_config = create_vae_diffusers_config_from_ldm(
        diffusers_original_config(config), checkpoint
    )
    reference = DiffusersAutoencoderKL(**diffusers_config).eval()
    converted = convert_ldm_vae_checkpoint(checkpoint, diffusers_config)
    reference.load_state_dict(converted, strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior, expected = ours.encode(x), reference.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, expected.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(posterior.logvar, expected.logvar, atol=1e-5, rtol=1e-5)
        z = posterior.mode()
        assert z.shape == (2, 4, 8, 8)
        torch.testing.assert_close(ours.decode(z), reference.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_attention_in_levels_runs_and_keeps_the_original_names():
    """diffusers' autoencoder has no level attention, so this variant is checked on its own."""
    model = build(tiny_config(attn_resolutions=[16]))
    keys = set(model.state_dict())
    assert {"encoder.down.1.attn.0.q.weight", "decoder.up.1.attn.1.proj_out.bias"} <= keys
    reconstructions, _ = model(torch.rand(1, 3, 32, 32))
    assert reconstructions.shape == (1, 3, 32, 32)


def test_posterior_sampling_mode_and_kl():
    params = torch.cat([torch.full((1, 2, 1, 1), 0.5), torch.full((1, 2, 1, 1), math.log(4.0))], 1)
    posterior = DiagonalGaussianDistribution(params)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(posterior.sample(g()), posterior.sample(g()))
    assert torch.equal(posterior.mode(), posterior.mean)
    # KL(N(0.5, 4) || N(0, 1)) = 0.5 (mu^2 + var - 1 - log var), summed over 2 elements
    expected = 2 * 0.5 * (0.25 + 4 - 1 - math.log(4.0))
    assert posterior.kl().item() == pytest.approx(expected)
    same = DiagonalGaussianDistribution(params)
    assert posterior.kl(same).item() == pytest.approx(0.0, abs=1e-6)
    deterministic = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(deterministic.sample(), deterministic.mean)
    assert deterministic.kl().item() == 0


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_ckpt_path_restores_weights_and_ignore_keys_skips(tmp_path, suffix):
    config = tiny_config()
    source = randomize(build(config))
    path = tmp_path / f"ae{suffix}"
    save_checkpoint(source.state_dict(), path)
    config.params.first_stage_config.params.ckpt_path = str(path)
    restored = build(config).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            source(x, sample_posterior=False)[0], restored(x, sample_posterior=False)[0]
        )
    config.params.first_stage_config.params.ignore_keys = ["decoder."]
    partial = build(config)
    assert torch.equal(partial.encoder.conv_in.weight, source.encoder.conv_in.weight)
    assert not torch.equal(partial.decoder.conv_in.weight, source.decoder.conv_in.weight)


@pytest.mark.parametrize(
    "ddconfig,error,message",
    [
        ({"attn_type": "linear"}, ValueError, "attn_type 'linear'"),
        ({"use_linear_attn": True}, NotImplementedError, "use_linear_attn"),
        ({"double_z": False}, ValueError, "double_z"),
    ],
)
def test_bad_ddconfig_is_named(ddconfig, error, message):
    with pytest.raises(error, match=message):
        build(tiny_config(**ddconfig))


def trainable_config():
    config = load_config("tiny/autoencoder.yaml").model
    config.params.lossconfig.params.disc_start = 10
    return config


def test_training_steps_reduce_reconstruction_loss_and_count_one_step_per_batch(tmp_path):
    model = instantiate_from_config(trainable_config())
    model.learning_rate = 2e-3
    smooth = torch.nn.functional.interpolate(
        torch.rand(8, 3, 4, 4) * 2 - 1, size=32, mode="bilinear"
    )
    images = smooth.permute(0, 2, 3, 1).contiguous()  # learnable structure, unlike white noise
    loader = torch.utils.data.DataLoader([{"image": im} for im in images], batch_size=8)
    with torch.no_grad():
        before = model.losses({"image": images}, "val")[2]["val/rec_loss"]
    trainer = pl.Trainer(
        max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, loader)
    assert trainer.global_step == 30
    with torch.no_grad():
        after = model.losses({"image": images}, "val")[2]["val/rec_loss"]
    assert after < 0.75 * before


def test_inference_loss_cannot_train():
    model = build(tiny_config())
    with pytest.raises(ValueError, match="LPIPSWithDiscriminator"):
        model.configure_optimizers()
