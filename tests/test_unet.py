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
        ({"num_classes": 10}, "num_classes"),
        ({"use_spatial_transformer": False}, "use_spatial_transformer"),
        ({"num_head_channels": 8}, "exactly one of num_heads and num_head_channels"),
        ({"model_channels": 20}, "multiple of 32"),
    ],
)
def test_unsupported_unet_params_are_named(override, message):
    with pytest.raises((NotImplementedError, ValueError), match=message):
        instantiate_from_config(tiny_unet_config(**override).params.unet_config)
