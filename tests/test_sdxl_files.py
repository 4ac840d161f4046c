"""SDXL files: full-size base and refiner state dicts, built on the meta device from the
released configs, are what diffusers' single-file code identifies as `xl_base` /
`xl_refiner` and converts, part by part, with no missing or unexpected keys."""

from __future__ import annotations

import pytest
import torch
from conftest import load_config
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.modules.encoders.modules import CLIP_CONFIGS, CLIP_SHARED
from ldm.util import instantiate_from_config

# diffusers' text_encoder_2 of SDXL: OpenCLIP ViT-bigG/14's text tower as a transformers CLIP.
BIGG_TEXT = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
PREFIXES = {
    "xl_base": "conditioner.embedders.1.model.",
    "xl_refiner": "conditioner.embedders.0.model.",
}


def full_size(name: str) -> tuple[dict, dict]:
    config = load_config(f"sdxl/{name}")
    with torch.device("meta"):
        engine = instantiate_from_config(config.model)
    return engine.state_dict(), OmegaConf.to_container(config)


def shapes(state_dict: dict, strip: str = "") -> dict:
    return {k.removeprefix(strip): tuple(v.shape) for k, v in state_dict.items()}


def meta_model(cls, *args, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return cls(*args, **kwargs)


@pytest.mark.parametrize(
    "name,kind", [("sd_xl_base.yaml", "xl_base"), ("sd_xl_refiner.yaml", "xl_refiner")]
)
def test_full_size_sdxl_state_dicts_convert_part_by_part(name, kind):
    checkpoint, original = full_size(name)
    assert sfu.infer_diffusers_model_type(checkpoint) == kind

    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    unet = meta_model(UNet2DConditionModel, **unet_config)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config)
    assert shapes(converted) == shapes(unet.state_dict())

    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae = meta_model(DiffusersAutoencoderKL, **vae_config)
    converted = sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config)
    assert shapes(converted) == shapes(vae.state_dict())

    bigg = meta_model(CLIPTextModelWithProjection, CLIPTextConfig(**(CLIP_SHARED | BIGG_TEXT)))
    converted = sfu.convert_open_clip_checkpoint(bigg, checkpoint, prefix=PREFIXES[kind])
    assert shapes(converted, "text_model.") == shapes(bigg.state_dict(), "text_model.")
    ours = {k for k in checkpoint if k.startswith(PREFIXES[kind])}
    # Every tensor of the tower has its diffusers place, except CLIP's temperature; each
    # block's fused in_proj weight and bias become q, k and v.
    assert len(ours - {PREFIXES[kind] + "logit_scale"}) + 4 * 32 == len(bigg.state_dict())

    if kind == "xl_base":
        clip = meta_model(
            CLIPTextModel,
            CLIPTextConfig(**CLIP_SHARED, **CLIP_CONFIGS["openai/clip-vit-large-patch14"]),
        )
        converted = sfu.convert_ldm_clip_checkpoint(
            checkpoint, remove_prefix="conditioner.embedders.0.transformer."
        )
        assert shapes(converted, "text_model.") == shapes(clip.state_dict(), "text_model.")
    other = {
        k for k in checkpoint if not k.startswith(("model.", "first_stage_model.", "conditioner."))
    }
    assert other == {"denoiser.sigmas"}
