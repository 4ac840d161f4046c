"""The UNet options SDXL needs (per-level transformer depth, the middle depth, a context_dim list,
num_attention_blocks) and its size and crop embedder: the released layouts through diffusers'
converters, and parity with diffusers' `addition_embed_type="text_time"` UNet."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from test_unet import UNET_PREFIX, randomize

from ldm.modules.encoders.modules import ConcatTimestepEmbedderND
from ldm.util import instantiate_from_config

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
# The network_config params of generative-models' configs/inference/sd_xl_base.yaml and
# sd_xl_refiner.yaml, as released (the refiner's omits use_spatial_transformer and legacy).
SDXL_BASE_UNET = {
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "use_checkpoint": True,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": [1, 2, 10],
    "context_dim": 2048,
    "spatial_transformer_attn_type": "softmax-xformers",
    "legacy": False,
}
SDXL_REFINER_UNET = {
    "adm_in_channels": 2560,
    "num_classes": "sequential",
    "use_checkpoint": True,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 384,
    "attention_resolutions": [4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "use_linear_in_transformer": True,
    "transformer_depth": 4,
    "context_dim": [1280, 1280, 1280, 1280],
    "spatial_transformer_attn_type": "softmax-xformers",
}
# Tiny UNets of the two shapes: 8-channel heads, linear projections, the size vector of a
# 16-wide pooled text embedding and 3 (h, w) pairs of 4-channel Fourier features (16 + 24).
TIME_DIM, POOLED_DIM = 4, 16
TINY_BASE = {
    "adm_in_channels": POOLED_DIM + 6 * TIME_DIM,
    "num_classes": "sequential",
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2],
    "num_head_channels": 8,
    "use_linear_in_transformer": True,
    "transformer_depth": [1, 2, 3],
    "context_dim": 32,
    "legacy": False,
}
TINY_REFINER = TINY_BASE | {
    "channel_mult": [1, 1, 2, 2],
    "transformer_depth": 2,
    "context_dim": [32, 32],
}


def unet_config(params: dict) -> dict:
    return {"target": UNET_TARGET, "params": params}


def diffusers_config(params: dict, checkpoint: dict) -> dict:
    """diffusers' UNet2DConditionModel config for a generative-models network_config."""
    original = {
        "model": {
            "params": {
                "network_config": unet_config(params),
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    return create_unet_diffusers_config_from_ldm(original, checkpoint)


@pytest.mark.parametrize("params", [SDXL_BASE_UNET, SDXL_REFINER_UNET], ids=["base", "refiner"])
def test_full_size_sdxl_unets_convert_to_diffusers_text_time_unets(params):
    with torch.device("meta"):
        unet = instantiate_from_config(unet_config(params))
    checkpoint = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    config = diffusers_config(params, checkpoint)
    assert config["addition_embed_type"] == "text_time"
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    # Nothing of ours left behind: the converter used every parameter.
    count = sum(v.numel() for v in checkpoint.values())
    assert count == sum(p.numel() for p in reference.parameters())
    if params is SDXL_BASE_UNET:
        assert count == 2_567_463_684  # the released base UNet's parameter count


def tiny_pair(params: dict) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    unet = randomize(instantiate_from_config(unet_config(params))).eval()
    checkpoint = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    # diffusers tells SDXL by its context widths (2048, 1280); say text_time for a tiny one.
    config = diffusers_config(params, checkpoint) | {
        "class_embed_type": None,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_DIM,
    }
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return unet, reference.eval()


@pytest.mark.parametrize("params", [TINY_BASE, TINY_REFINER], ids=["base", "refiner"])
def test_tiny_sdxl_unet_with_size_embeddings_matches_diffusers_text_time(params):
    unet, reference = tiny_pair(params)
    depths = [len(b.attentions[0].transformer_blocks) for b in reference.down_blocks[1:3]]
    middle = len(reference.mid_block.attentions[0].transformer_blocks)
    assert (depths, middle) == (([2, 3], 3) if params is TINY_BASE else ([2, 2], 2))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 870]), torch.randn(2, 7, 32)
    pooled = torch.randn(2, POOLED_DIM)
    original = torch.tensor([[1024.0, 768.0], [512.0, 512.0]])
    crop = torch.tensor([[0.0, 64.0], [12.0, 0.0]])
    target = torch.tensor([[1024.0, 1024.0], [768.0, 1344.0]])
    embed = ConcatTimestepEmbedderND(TIME_DIM)
    y = torch.cat([pooled, embed(original), embed(crop), embed(target)], dim=1)  # (B, 40)
    time_ids = torch.cat([original, crop, target], dim=1)  # (B, 6), diffusers' order
    with torch.no_grad():
        ours = unet(x, t, context=context, y=y)
        theirs = reference(
            x,
            t,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        other_crop = unet(x, t, context=context, y=y.roll(1, dims=0))
    assert not torch.allclose(other_crop, ours, atol=1e-3)  # the vector reaches the output
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_middle_depth_and_attention_block_counts_follow_the_generative_models_rules():
    unet = instantiate_from_config(
        unet_config(TINY_BASE | {"transformer_depth_middle": 1, "num_attention_blocks": [2, 1, 0]})
    )
    assert len(unet.middle_block[1].transformer_blocks) == 1
    # Level 1 (ds 2): attention after the first res block only, in and out; level 2: none.
    with_attention = [len(block) > 1 for block in unet.input_blocks]
    assert with_attention == [False, False, False, False, True, False, False, False, False]
    output = [len(block) - (i in (2, 5)) > 1 for i, block in enumerate(unet.output_blocks)]
    assert output == [False, False, False, True, False, False, False, False, False]
    assert len(unet.input_blocks[4][1].transformer_blocks) == 2


def test_size_embedder_is_sinusoidal_per_number_concatenated():
    x = torch.tensor([[1024.0, 0.0], [7.0, 512.0]])
    emb = ConcatTimestepEmbedderND(6)(x)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(3) / 3)  # (3,)
    for b in range(2):
        for d in range(2):
            args = x[b, d] * freqs
            expected = torch.cat([torch.cos(args), torch.sin(args)])
            torch.testing.assert_close(emb[b, 6 * d : 6 * d + 6], expected)
    assert ConcatTimestepEmbedderND(6)(torch.tensor([3.0, 4.0])).shape == (2, 6)
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, D\) tensor.*got list"):
        ConcatTimestepEmbedderND(6)([[1024, 1024]])


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"transformer_depth": [1, 2]}, r"transformer_depth must be an int or a list of 3 ints"),
        ({"num_res_blocks": [2, 2]}, r"num_res_blocks must be an int or a list of 3 ints"),
        ({"context_dim": [32, 64]}, r"context_dim list must repeat one width"),
        ({"num_attention_blocks": [2, 3, 0]}, r"num_attention_blocks needs one int per level"),
        ({"spatial_transformer_attn_type": "vanilla"}, r"spatial_transformer_attn_type"),
    ],
)
def test_sdxl_unet_params_that_cannot_work_are_named(overrides, message):
    with pytest.raises((ValueError, NotImplementedError), match=message):
        instantiate_from_config(unet_config(TINY_BASE | overrides))
