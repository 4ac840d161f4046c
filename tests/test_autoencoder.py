"""AutoencoderKL: SD key layout, parity with diffusers' AutoencoderKL, posterior, flags, loading."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import load_config, sd_manifest
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)
from einops import repeat
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, save_checkpoint
from ldm.modules.diffusionmodules.model import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
)
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError, instantiate_from_config

PREFIX = "first_stage_model."
SCALE_FACTOR = 0.18215
# 32 px RGB <-> (4, 16, 16) latents; the mid block has attention, the levels none.
TINY_YAML = """
target: ldm.models.autoencoder.AutoencoderKL
params:
  embed_dim: 4
  monitor: val/rec_loss
  ddconfig:
    double_z: true
    z_channels: 4
    resolution: 32
    in_channels: 3
    out_ch: 3
    ch: 32
    ch_mult: [1, 2]
    num_res_blocks: 1
    attn_resolutions: []
    dropout: 0.0
  lossconfig:
    target: torch.nn.Identity
"""
# The first stage of the original configs/stable-diffusion/v1-inference.yaml.
SD_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
# Level attention at 16 px, the lowest resolution of the tiny config.
LEVEL_ATTN = {"attn_resolutions": [16]}


def tiny_config(ddconfig: dict | None = None, **params):
    """The tiny AutoencoderKL config, with `ddconfig` entries and top-level `params` replaced."""
    config = OmegaConf.create(TINY_YAML)
    config.params.ddconfig.update(ddconfig or {})
    config.params.update(params)
    return config


def build(ddconfig: dict | None = None, **params):
    return instantiate_from_config(tiny_config(ddconfig, **params))


def randomize(model, seed: int = 0):
    """Random weights of a realistic scale (GroupNorm affine included), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_full_size_sd_v1_keys_and_shapes_on_meta():
    config = tiny_config(SD_DDCONFIG)
    with torch.device("meta"):
        model = instantiate_from_config(config)
    assert all(p.is_meta for p in model.parameters())
    ours = {PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: v for k, v in sd_manifest("v1").items() if k.startswith(PREFIX)}
    assert len(expected) == 248
    assert ours == expected


def to_diffusers(model, ddconfig: dict) -> DiffusersAutoencoderKL:
    """diffusers' AutoencoderKL holding `model`'s weights, converted as for a single SD file."""
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    original_config = {
        "model": {
            "params": {
                "scale_factor": SCALE_FACTOR,
                "first_stage_config": {"params": {"ddconfig": ddconfig}},
            }
        }
    }
    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    # The converter ignores attn_type; diffusers' switch for an attention-free mid block:
    config["mid_block_add_attention"] = ddconfig.get("attn_type", "vanilla") != "none"
    reference = DiffusersAutoencoderKL(**config)
    reference.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return reference.eval()


def encode_decode(model, reference, x):
    """(ours, diffusers') posterior mean, logvar and decoding of the mean, for images `x`."""
    with torch.no_grad():
        posterior, expected = model.encode(x), reference.encode(x).latent_dist
        z = posterior.mode()  # (B, 4, 16, 16)
        ours = (posterior.mean, posterior.logvar, model.decode(z))
        return ours, (expected.mean, expected.logvar, reference.decode(z).sample)


@pytest.mark.parametrize("attn_type", ["vanilla", "vanilla-xformers", "none"])
def test_tiny_autoencoder_matches_diffusers(attn_type):
    """Encode (mean, logvar) and decode agree with diffusers: 1e-5 in fp32, 1e-10 in fp64.

    "vanilla" exercises AttnBlock (the mid block's); "none" is the attention-free network.
    diffusers has no attention inside the levels, so LEVEL_ATTN is checked by call order below.
    fp32 allows 1e-5 plus 1e-5 relative: diffusers' fp32 attention lands up to ~1e-5 from a
    float64 run of the same weights on outputs of size ~2 (ours ~2e-6), so the float64 run is
    the exact comparison.
    """
    ours = randomize(build({"attn_type": attn_type}))
    ddconfig = OmegaConf.to_container(tiny_config({"attn_type": attn_type}).params.ddconfig)
    reference = to_diffusers(ours, ddconfig)
    x = images()
    actual, expected = encode_decode(ours, reference, x)
    assert actual[0].shape == (2, 4, 16, 16) and actual[2].shape == x.shape
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    actual, expected = encode_decode(ours.double(), reference.double(), x.double())
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=0)


def test_attn_type_none_has_no_attention_weights():
    keys = set(build({"attn_type": "none"}).state_dict())
    assert not any(".attn" in k for k in keys)
    assert "encoder.mid.block_2.conv2.weight" in keys


def record_calls(network) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Hooks that append (name, input, output) for each block of `network` as it runs."""
    calls = []
    for name, module in network.named_modules():
        if isinstance(module, ResnetBlock | AttnBlock | Downsample | Upsample):
            module.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, args[0], out))
            )
    return calls


def test_level_attention_runs_after_each_block_in_the_original_order():
    model = randomize(build(LEVEL_ATTN))
    keys = set(model.state_dict())
    assert {"encoder.down.1.attn.0.q.weight", "decoder.up.1.attn.1.proj_out.bias"} <= keys
    encoder_calls, decoder_calls = record_calls(model.encoder), record_calls(model.decoder)
    with torch.no_grad():
        reconstruction, _ = model(images(1), sample_posterior=False)
    assert reconstruction.shape == (1, 3, 32, 32)
    assert [name for name, _, _ in encoder_calls] == [
        "down.0.block.0",
        "down.0.downsample",
        "down.1.block.0",
        "down.1.attn.0",
        "mid.block_1",
        "mid.attn_1",
        "mid.block_2",
    ]
    assert [name for name, _, _ in decoder_calls] == [
        "mid.block_1",
        "mid.attn_1",
        "mid.block_2",
        "up.1.block.0",
        "up.1.attn.0",
        "up.1.block.1",
        "up.1.attn.1",
        "up.1.upsample",
        "up.0.block.0",
        "up.0.block.1",
    ]
    for calls in (encoder_calls, decoder_calls):  # each block reads the previous one's output
        for (_, _, out), (_, nxt, _) in zip(calls, calls[1:], strict=False):
            assert nxt is out


def test_give_pre_end_returns_the_features_before_the_output_head():
    plain = randomize(build())
    pre_end = build({"give_pre_end": True}).eval()
    pre_end.load_state_dict(plain.state_dict())
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        features = pre_end.decode(z)  # (1, ch * ch_mult[0], 32, 32)
        head = plain.decoder.conv_out(F.silu(plain.decoder.norm_out(features)))
        assert features.shape == (1, 32, 32, 32)
        torch.testing.assert_close(head, plain.decode(z), atol=0, rtol=0)


def test_tanh_out_squashes_the_decoder_output():
    plain = randomize(build())
    squashed = build({"tanh_out": True}).eval()
    squashed.load_state_dict(plain.state_dict())
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(squashed.decode(z), torch.tanh(plain.decode(z)))


def test_resampling_without_conv_pools_and_repeats():
    model = build({"resamp_with_conv": False})
    assert not any("sample.conv" in k for k in model.state_dict())
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(Downsample(32, False)(x), F.avg_pool2d(x, 2))
    expected = repeat(x, "b c h w -> b c (h 2) (w 2)")
    assert torch.equal(Upsample(32, False)(x), expected)
    with torch.no_grad():
        assert model(images(1))[0].shape == (1, 3, 32, 32)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(32, True)
    assert down.conv.padding == (0, 0) and down.conv.stride == (2, 2)
    assert down(torch.randn(1, 32, 32, 32)).shape == (1, 32, 16, 16)
    assert down(torch.randn(1, 32, 31, 31)).shape == (1, 32, 15, 15)


def test_dropout_acts_in_training_mode_only():
    model = randomize(build({"dropout": 0.5}))
    x = images(1)
    with torch.no_grad():
        assert torch.equal(model(x, False)[0], model(x, False)[0])
        model.train()
        assert not torch.equal(model(x, False)[0], model(x, False)[0])


def test_resnet_block_adds_the_projected_time_embedding():
    assert not hasattr(ResnetBlock(32, 64), "temb_proj")
    block = ResnetBlock(32, 64, temb_channels=16).eval()
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    with torch.no_grad():
        with_temb = block(x, temb)
        block.temb_proj.weight.zero_()
        block.temb_proj.bias.zero_()
        torch.testing.assert_close(block(x, temb), block(x))
    assert not torch.allclose(with_temb, block(x))


def test_get_input_moves_channels_first_as_contiguous_float():
    batch = {"image": torch.rand(2, 32, 16, 3, dtype=torch.float64) * 2 - 1}
    x = build().get_input(batch, "image")
    assert x.shape == (2, 3, 32, 16) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x[1, 2], batch["image"][1, :, :, 2].float())


def test_forward_decodes_the_mode_or_a_sample():
    model = randomize(build())
    x = images(1)
    with torch.no_grad():
        reconstruction, posterior = model(x, sample_posterior=False)
        assert torch.equal(reconstruction, model.decode(posterior.mean))
        assert not torch.equal(model(x)[0], reconstruction)


def gaussian(mean: float, var: float, shape=(1, 2, 1, 1)) -> DiagonalGaussianDistribution:
    params = torch.cat([torch.full(shape, mean), torch.full(shape, math.log(var))], dim=1)
    return DiagonalGaussianDistribution(params.double())


def test_posterior_sample_is_seeded_and_mode_is_the_mean():
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    seeded = [posterior.sample(torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    assert seeded[0].shape == (2, 4, 4, 4)
    assert torch.equal(posterior.mode(), posterior.mean)


def test_posterior_kl_and_nll_match_the_closed_forms():
    p, q = gaussian(0.5, 4.0), gaussian(-1.0, 2.0)
    # KL(N(m, v) || N(0, 1)) = 0.5 (m^2 + v - 1 - log v), summed over 2 elements
    assert p.kl().item() == pytest.approx(0.25 + 4 - 1 - math.log(4.0))
    # KL(N(m1, v1) || N(m2, v2)) = 0.5 (log(v2 / v1) + (v1 + (m1 - m2)^2) / v2 - 1)
    assert p.kl(q).item() == pytest.approx(math.log(2.0 / 4.0) + (4.0 + 1.5**2) / 2.0 - 1)
    assert p.kl(p).item() == pytest.approx(0.0, abs=1e-12)
    x = torch.tensor([0.0, 3.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    expected = -torch.distributions.Normal(0.5, 2.0).log_prob(x).sum()
    assert p.nll(x).item() == pytest.approx(expected.item())


def test_posterior_logvar_is_clamped_and_deterministic_has_zero_std():
    params = torch.tensor([0.0, 0.0, 100.0, -100.0]).reshape(1, 4, 1, 1)  # [mean | logvar]
    assert DiagonalGaussianDistribution(params).logvar.flatten().tolist() == [20.0, -30.0]
    deterministic = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4), deterministic=True)
    assert not deterministic.std.any() and not deterministic.var.any()
    assert torch.equal(deterministic.sample(), deterministic.mean)
    assert torch.equal(deterministic.kl(), torch.zeros(2))
    assert torch.equal(deterministic.nll(deterministic.mean), torch.zeros(2))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_ckpt_path_restores_the_weights_bit_for_bit(tmp_path, suffix):
    source = randomize(build())
    path = tmp_path / f"ae{suffix}"
    save_checkpoint(source.state_dict(), path)
    restored = build(ckpt_path=str(path)).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(source.encode(x).mean, restored.encode(x).mean)
        assert torch.equal(source(x, False)[0], restored(x, False)[0])


def test_ignore_keys_leaves_those_weights_as_initialised(tmp_path):
    source = randomize(build())
    path = tmp_path / "ae.safetensors"
    save_checkpoint(source.state_dict(), path)
    torch.manual_seed(3)
    partial = build(ckpt_path=str(path), ignore_keys=["decoder."])
    torch.manual_seed(3)
    fresh = build()
    for key, value in partial.state_dict().items():
        expected = fresh if key.startswith("decoder.") else source
        assert torch.equal(value, expected.state_dict()[key]), key


def test_ckpt_path_names_keys_that_do_not_fit(tmp_path):
    state_dict = randomize(build()).state_dict()
    loss_state = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2)}
    path = tmp_path / "with-loss.ckpt"
    save_checkpoint({**state_dict, **loss_state}, path)
    build(ckpt_path=str(path))  # an original first-stage file carries its training loss's state
    extra = tmp_path / "extra.ckpt"
    save_checkpoint({**state_dict, "foo.bar": torch.zeros(1)}, extra)
    with pytest.raises(CheckpointError, match="foo.bar"):
        build(ckpt_path=str(extra))
    build(ckpt_path=str(extra), ignore_keys=["foo."])
    short = copy.copy(state_dict)
    del short["quant_conv.weight"]
    save_checkpoint(short, tmp_path / "short.ckpt")
    with pytest.raises(CheckpointError, match="quant_conv.weight"):
        build(ckpt_path=str(tmp_path / "short.ckpt"))


@pytest.mark.parametrize(
    "ddconfig,error,message",
    [
        ({"attn_type": "bogus"}, ConfigError, "attn_type 'bogus'"),
        ({"attn_type": "linear"}, NotImplementedError, "attn_type='linear'"),
        ({"use_linear_attn": True}, NotImplementedError, "use_linear_attn"),
        ({"double_z": False}, ValueError, "double_z"),
    ],
)
def test_bad_ddconfig_is_named(ddconfig, error, message):
    with pytest.raises(error, match=message):
        build(ddconfig)


def test_unimplemented_colorize_nlabels_is_refused():
    with pytest.raises(NotImplementedError, match="colorize_nlabels"):
        build(colorize_nlabels=3)


def fit(model, loader, steps: int, root) -> pl.Trainer:
    """`steps` training steps on the CPU, without logs, checkpoints or validation."""
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(model, loader)
    return trainer


def trainable_config():
    config = load_config("tiny/autoencoder.yaml").model
    config.params.lossconfig.params.disc_start = 10
    return config


def test_training_steps_reduce_reconstruction_loss_and_count_one_step_per_batch(tmp_path):
    model = instantiate_from_config(trainable_config())
    model.learning_rate = 2e-3
    smooth = F.interpolate(torch.rand(8, 3, 4, 4) * 2 - 1, size=32, mode="bilinear")
    batch_images = smooth.permute(0, 2, 3, 1).contiguous()  # learnable, unlike white noise
    loader = torch.utils.data.DataLoader([{"image": im} for im in batch_images], batch_size=8)
    with torch.no_grad():
        before = model.losses({"image": batch_images}, "val")[2]["val/rec_loss"]
    assert fit(model, loader, 30, tmp_path).global_step == 30
    with torch.no_grad():
        after = model.losses({"image": batch_images}, "val")[2]["val/rec_loss"]
    assert after < 0.75 * before


def test_the_critic_is_not_run_before_disc_start_and_adam_still_counts_its_steps(tmp_path):
    model = instantiate_from_config(trainable_config())  # disc_start 10
    critic = model.loss.discriminator
    calls = []
    critic.register_forward_hook(lambda *args: calls.append(model.global_step))
    initial = copy.deepcopy(critic.state_dict())
    images = torch.rand(4, 32, 32, 3) * 2 - 1
    loader = torch.utils.data.DataLoader([{"image": im} for im in images], batch_size=2)

    fit(model, loader, 3, tmp_path)
    assert calls == []  # nothing to learn from a loss multiplied by 0
    for key, value in critic.state_dict().items():
        assert torch.equal(value, initial[key]), key
    optimizer = model.trainer.optimizers[0]
    steps = {int(optimizer.state[p]["step"]) for p in critic.parameters()}
    assert steps == {3}  # as a zero-weighted critic loss steps it: same Adam bias correction
    model.loss.discriminator_iter_start = 0
    fit(model, loader, 1, tmp_path)
    assert len(calls) == 3  # the generator term, then the critic on the real and the fake
    assert not torch.equal(critic.state_dict()["main.0.weight"], initial["main.0.weight"])


def test_inference_loss_cannot_train():
    with pytest.raises(ValueError, match="LPIPSWithDiscriminator"):
        build().configure_optimizers()
