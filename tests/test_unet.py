"""UNetModel: SD key layout, parity with diffusers' UNet2DConditionModel, checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import diffusers_original_config, load_config, sd_manifest
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

from ldm.util import instantiate_from_config

UNET_PREFIX = "model.diffusion_model."


def tiny_unet_config(**overrides):
    """The tiny model config with UNet params replaced; a value of None removes the param."""
    config = load_config("tiny/txt2img.yaml").model
    params = config.params.unet_config.params
    for key, value in overrides.items():
        params.pop(key) if value is None else params.__setitem__(key, value)
    return config


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere, zero-initialised output convs included."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module


@pytest.mark.parametrize(
    "version,config", [("v1", "v1-inference.yaml"), ("v2", "v2-inference.yaml")]
)
def test_full_size_unet_keys_match_sd(version, config):
    unet_config = load_config(f"stable-diffusion/{config}").model.params.unet_config
    with torch.device("meta"):
        unet = instantiate_from_config(unet_config)
    ours = {UNET_PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    expected = {k: v for k, v in sd_manifest(version).items() if k.startswith(UNET_PREFIX)}
    assert ours == expected


def to_diffusers(model_config, unet) -> UNet2DConditionModel:
    checkpoint = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    original = diffusers_original_config(model_config)
    config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=None)
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return reference.eval()


SD1_HEADS = {}  # the tiny config's own: num_heads, 1x1-conv projections
SD2_HEADS = {"num_heads": None, "num_head_channels": 8, "use_linear_in_transformer": True}


@pytest.mark.parametrize("overrides", [SD1_HEADS, SD2_HEADS], ids=["sd1-style", "sd2-style"])
def test_tiny_unet_matches_diffusers(overrides):
    model_config = tiny_unet_config(**overrides)
    unet = randomize(instantiate_from_config(model_config.params.unet_config)).eval()
    reference = to_diffusers(model_config, unet)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 917])
    context = torch.randn(2, 77, 32)
    with torch.no_grad():
        ours = unet(x, t, context=context)
        theirs = reference(x, t, encoder_hidden_states=context).sample
    assert ours.shape == (2, 4, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    params = tiny_unet_config().params.unet_config
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 5, 32)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        params.params.use_checkpoint = use_checkpoint
        unet = randomize(instantiate_from_config(params))
        unet(x, t, context=context).square().mean().backward()
        grads.append([p.grad for p in unet.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_checkpointing_recomputes_in_backward(monkeypatch):
    params = tiny_unet_config(use_checkpoint=True).params.unet_config
    unet = instantiate_from_config(params)
    calls = []
    block = unet.input_blocks[1][0]
    original = block._forward
    monkeypatch.setattr(block, "_forward", lambda *a: calls.append(1) or original(*a))
    unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 32)).sum().backward()
    assert len(calls) == 2  # once forward, once recomputed during backward


@pytest.mark.parametrize(
    "override,message",
    [
        ({"num_classes": "bogus"}, "num_classes"),
        ({"context_dim": None}, "use_spatial_transformer needs an int context_dim"),
        ({"num_head_channels": 8}, "exactly one of num_heads and num_head_channels"),
        ({"model_channels": 20}, "multiple of 32"),
    ],
)
def test_unsupported_unet_params_are_named(override, message):
    with pytest.raises((NotImplementedError, ValueError), match=message):
        instantiate_from_config(tiny_unet_config(**override).params.unet_config)


def unconditional_unet_config(**overrides):
    params = dict(
        image_size=16,
        in_channels=3,
        out_channels=3,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=[1, 2],
        num_heads=2,
    )
    params.update(overrides)
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}


def original_qkv_attention(qkv, heads: int, new_order: bool):
    """The original QKVAttentionLegacy / QKVAttention, written out with einsum and softmax."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, t) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    scale = 1 / ch**0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, t)


@pytest.mark.parametrize("new_order", [False, True])
def test_unconditional_unet_attention_matches_the_original_math(new_order):
    config = unconditional_unet_config(use_new_attention_order=new_order)
    unet = randomize(instantiate_from_config(config)).eval()
    keys = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert keys["input_blocks.3.1.qkv.weight"] == (192, 64, 1)
    assert keys["middle_block.1.proj_out.weight"] == (64, 64, 1)
    assert not any("transformer" in k for k in keys)
    block = unet.middle_block[1]
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        flat = x.reshape(2, 64, 16)
        h = original_qkv_attention(block.qkv(block.norm(flat)), 2, new_order)
        expected = (flat + block.proj_out(h)).reshape(2, 64, 4, 4)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
        assert unet(torch.randn(2, 3, 16, 16), torch.tensor([3, 700])).shape == (2, 3, 16, 16)


def test_num_heads_upsample_sets_the_decoder_heads_of_legacy_unets():
    config = unconditional_unet_config(num_heads=4, num_heads_upsample=2, legacy=True)
    unet = instantiate_from_config(config)
    assert unet.input_blocks[3][1].num_heads == 4 and unet.middle_block[1].num_heads == 4
    assert unet.output_blocks[0][1].num_heads == 2
    config = unconditional_unet_config(num_heads=4, num_heads_upsample=2, legacy=False)
    assert instantiate_from_config(config).output_blocks[0][1].num_heads == 4  # as the original


def test_pixel_ddpm_trains_with_the_original_unet():
    from conftest import fit_fixed_batch

    from ldm.models.diffusion.ddpm import DDPM

    model = DDPM(
        unet_config=unconditional_unet_config(),
        image_size=16,
        channels=3,
        parameterization="v",
        beta_schedule="cosine",
        use_ema=False,
    )
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t, noise = torch.tensor([10, 300, 600, 900]), torch.randn(4, 3, 16, 16)
    losses, _ = fit_fixed_batch(model, x0, None, t, noise, steps=15, lr=1e-3)
    assert losses[-1] < 0.7 * losses[0]
    with torch.no_grad():
        assert model.sample(None, 2, steps=3).shape == (2, 3, 16, 16)
