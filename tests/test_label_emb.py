"""UNetModel's class-label embedding (`num_classes`, `y`) and the x4 upscaler's low-scale model:
the original key names, parity with diffusers, and the noise augmentation's closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from test_unet import UNET_PREFIX, randomize, tiny_unet_config, to_diffusers

from ldm.modules.diffusionmodules.upscaling import (
    ImageConcatWithNoiseAugmentation,
    SimpleImageConcat,
)
from ldm.util import instantiate_from_config

# The tiny UNet shaped like the SD 2 x4 upscaler: 4 latent + 3 image channels in, the noise
# level as a class label, self-attention disabled in the first level (attn1 attends to context).
UPSCALER = {
    "in_channels": 7,
    "out_channels": 4,
    "num_classes": 1000,
    "disable_self_attentions": [True, False],
    "disable_middle_self_attn": False,
    "use_linear_in_transformer": True,
}
HEADS = {
    "num_head_channels": {"num_heads": None, "num_head_channels": 8},
    "num_heads": {"num_heads": 4},  # as the x4 config (num_heads: 8)
}
SEQUENTIAL = {"num_classes": "sequential", "adm_in_channels": 12}
# The released x4-upscaling.yaml: the UNet and the low-scale model, full size.
X4_UNET = {
    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "params": {
        "use_checkpoint": True,
        "num_classes": 1000,
        "image_size": 128,
        "in_channels": 7,
        "out_channels": 4,
        "model_channels": 256,
        "attention_resolutions": [2, 4, 8],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 2, 4],
        "disable_self_attentions": [True, True, True, False],
        "disable_middle_self_attn": False,
        "num_heads": 8,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 1024,
        "legacy": False,
        "use_linear_in_transformer": True,
    },
}
X4_LOW_SCALE = {
    "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
    "params": {
        "noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
        "max_noise_level": 350,
    },
}
# The buffers the original AbstractLowScaleModel.register_schedule registers.
ORIGINAL_BUFFERS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
}


def tiny_unet(**overrides) -> torch.nn.Module:
    return instantiate_from_config(tiny_unet_config(**overrides).params.unet_config)


def test_label_emb_keys_and_shapes_are_the_originals():
    shapes = {k: tuple(v.shape) for k, v in tiny_unet(num_classes=1000).state_dict().items()}
    assert shapes["label_emb.weight"] == (1000, 128)  # (num_classes, 4 * model_channels)
    shapes = {k: tuple(v.shape) for k, v in tiny_unet(**SEQUENTIAL).state_dict().items()}
    label = {k: v for k, v in shapes.items() if k.startswith("label_emb.")}
    assert label == {
        "label_emb.0.0.weight": (128, 12),
        "label_emb.0.0.bias": (128,),
        "label_emb.0.2.weight": (128, 128),
        "label_emb.0.2.bias": (128,),
    }
    shapes = {
        k: tuple(v.shape) for k, v in tiny_unet(num_classes="continuous").state_dict().items()
    }
    assert shapes["label_emb.weight"] == (128, 1)
    assert not any(k.startswith("label_emb") for k in tiny_unet().state_dict())


def test_disabled_self_attention_attends_to_the_context():
    unet = tiny_unet(**UPSCALER)
    to_k = "transformer_blocks.0.attn1.to_k.weight"
    assert unet.input_blocks[1][1].state_dict()[to_k].shape == (32, 32)  # context_dim 32
    assert unet.input_blocks[1][1].transformer_blocks[0].disable_self_attn
    assert not unet.input_blocks[3][1].transformer_blocks[0].disable_self_attn
    assert not unet.middle_block[1].transformer_blocks[0].disable_self_attn
    assert unet.output_blocks[0][1].transformer_blocks[0].disable_self_attn is False  # level 1
    assert unet.output_blocks[-1][1].transformer_blocks[0].disable_self_attn is True  # level 0


@pytest.mark.parametrize("heads", list(HEADS.values()), ids=list(HEADS))
def test_tiny_upscaler_unet_matches_diffusers(heads):
    model_config = tiny_unet_config(**UPSCALER, **heads)
    unet = randomize(instantiate_from_config(model_config.params.unet_config)).eval()
    reference = to_diffusers(model_config, unet)
    assert reference.config.only_cross_attention == [True, False]
    assert reference.config.num_class_embeds == 1000
    x, t, context = torch.randn(2, 7, 16, 16), torch.tensor([3, 917]), torch.randn(2, 5, 32)
    noise_level = torch.tensor([20, 349])  # diffusers' upscaler passes it as class_labels
    with torch.no_grad():
        ours = unet(x, t, context=context, y=noise_level)
        theirs = reference(x, t, encoder_hidden_states=context, class_labels=noise_level).sample
        other_level = unet(x, t, context=context, y=torch.tensor([21, 0]))
    assert not torch.allclose(other_level, ours, atol=1e-3)  # the label reaches the output
    assert ours.shape == (2, 4, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_sequential_label_emb_matches_diffusers_projection_class_embedding():
    model_config = tiny_unet_config(**SEQUENTIAL)
    unet = randomize(instantiate_from_config(model_config.params.unet_config)).eval()
    reference = to_diffusers(model_config, unet)
    assert reference.config.class_embed_type == "projection"
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.randn(2, 5, 32)
    y = torch.randn(2, 12)
    with torch.no_grad():
        ours = unet(x, t, context=context, y=y)
        theirs = reference(x, t, encoder_hidden_states=context, class_labels=y).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_continuous_label_emb_is_added_to_the_time_embedding():
    unet = randomize(tiny_unet(num_classes="continuous")).eval()
    plain = tiny_unet().eval()
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if "label_emb" not in k})
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.randn(2, 5, 32)
    y = torch.tensor([[0.3], [-1.2]])
    with torch.no_grad():
        added = unet.label_emb(y)  # (B, 4 mc)
        plain.time_embed.register_forward_hook(lambda module, args, out: out + added)
        torch.testing.assert_close(unet(x, t, context, y=y), plain(x, t, context))


def test_full_size_x4_upscaler_unet_has_diffusers_x4_structure():
    with torch.device("meta"):
        unet = instantiate_from_config(X4_UNET)
    checkpoint = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    assert checkpoint[UNET_PREFIX + "label_emb.weight"].shape == (1000, 1024)
    original = {
        "model": {
            "params": {
                "unet_config": X4_UNET,
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4]}}},
            }
        }
    }
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    assert config["only_cross_attention"] == [True, True, True, False]
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_classes": "bogus"}, "num_classes must be a positive int"),
        ({"num_classes": True}, "num_classes must be a positive int"),
        ({"num_classes": "sequential"}, "needs an int adm_in_channels"),
        ({"num_classes": 10, "adm_in_channels": 12}, "adm_in_channels is read only"),
        ({"disable_self_attentions": [True]}, "disable_self_attentions needs one bool"),
    ],
)
def test_label_params_that_cannot_work_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(**overrides)


@pytest.mark.parametrize(
    "overrides,y,message",
    [
        ({"num_classes": 10}, None, r"needs y as \(B,\) integer class ids, \(2,\) here; got None"),
        ({"num_classes": 10}, torch.zeros(2), r"integer class ids.*got \(2,\) torch.float32"),
        ({"num_classes": 10}, torch.zeros(3, dtype=torch.long), r"\(2,\) here; got \(3,\)"),
        (SEQUENTIAL, torch.zeros(2, 5), r"\(B, adm_in_channels\) floats, \(2, 12\) here"),
        ({"num_classes": "continuous"}, torch.zeros(2), r"\(B, 1\) floats"),
        ({}, torch.zeros(2, dtype=torch.long), "got class labels `y`, but num_classes is not"),
    ],
)
def test_missing_or_unexpected_y_is_named(overrides, y, message):
    unet = tiny_unet(**overrides)
    with pytest.raises(ValueError, match=message):
        unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 32), y=y)


def sd_linear_alphas_cumprod(n: int, start: float, end: float) -> np.ndarray:
    """SD's "linear" schedule by hand: linear in sqrt(beta)."""
    betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


@pytest.mark.parametrize(
    "beta_schedule,diffusers_schedule",
    [("linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")],
)
def test_low_scale_schedule_matches_diffusers(beta_schedule, diffusers_schedule):
    config = {"beta_schedule": beta_schedule, "linear_start": 1e-4, "linear_end": 2e-2}
    model = ImageConcatWithNoiseAugmentation(config, max_noise_level=350)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=2e-2,
        beta_schedule=diffusers_schedule,
    )
    torch.testing.assert_close(model.alphas_cumprod, scheduler.alphas_cumprod, atol=1e-6, rtol=0)


def test_x4_low_scale_model_noises_in_closed_form():
    model = instantiate_from_config(X4_LOW_SCALE)
    ac = torch.from_numpy(sd_linear_alphas_cumprod(1000, 1e-4, 2e-2)).float()
    torch.testing.assert_close(model.alphas_cumprod, ac, atol=1e-6, rtol=0)
    x, noise, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 20, 349])
    expected = (
        ac[t].sqrt()[:, None, None, None] * x + (1 - ac[t]).sqrt()[:, None, None, None] * noise
    )
    torch.testing.assert_close(model.q_sample(x, t, noise), expected, atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    z, level = model(x, noise_level=t)
    torch.manual_seed(0)
    fresh = torch.randn_like(x)
    assert level is t
    torch.testing.assert_close(z, model.q_sample(x, t, fresh))


def test_noise_levels_are_drawn_in_range():
    model = instantiate_from_config(X4_LOW_SCALE)
    torch.manual_seed(0)
    _, level = model(torch.zeros(4096, 1, 1, 1))
    assert level.shape == (4096,) and level.dtype == torch.long
    assert level.min() >= 0 and level.max() < 350
    assert level.min() < 10 and level.max() > 340  # drawn over the whole range
    with pytest.raises(TypeError, match="noise_level must be a"):
        model(torch.zeros(2, 1, 1, 1), noise_level=20)


def test_low_scale_buffers_are_the_originals_and_load_strictly():
    model = instantiate_from_config(X4_LOW_SCALE)
    state = model.state_dict()
    assert set(state) == ORIGINAL_BUFFERS  # persistent, so `low_scale_model.*` in checkpoints
    assert all(v.shape == (1000,) and v.dtype == torch.float32 for v in state.values())
    fresh = instantiate_from_config(X4_LOW_SCALE)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)


def test_simple_image_concat_keeps_the_image_at_level_zero():
    x = torch.randn(2, 3, 4, 4)
    z, level = SimpleImageConcat()(x)
    assert z is x and level.tolist() == [0, 0] and level.dtype == torch.long
    assert SimpleImageConcat().state_dict() == {}


def test_to_cuda_is_a_compat_param_and_max_noise_level_is_checked():
    config = X4_LOW_SCALE["params"]["noise_schedule_config"]
    with pytest.warns(UserWarning, match="to_cuda is ignored"):
        model = ImageConcatWithNoiseAugmentation(config, max_noise_level=350, to_cuda=True)
    assert model.alphas_cumprod.device.type == "cpu"
    with pytest.raises(ValueError, match="max_noise_level must be in"):
        ImageConcatWithNoiseAugmentation(config, max_noise_level=1001)
