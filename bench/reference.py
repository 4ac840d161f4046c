"""The reference: diffusers models holding our random weights, converted as for a single file.

Both sides then compute the same function (the parity tests check it), so a benchmark that
times them compares implementations, not models.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from omegaconf import OmegaConf

from bench.common import ROOT
from ldm.util import instantiate_from_config

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


def model_config(relative: str):
    """`model:` of a config under configs/."""
    return OmegaConf.load(ROOT / "configs" / relative).model


def original_config(config) -> dict:
    return {"model": OmegaConf.to_container(config, resolve=True)}


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Small random weights everywhere (zero-initialised output layers included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def ours_unet(config, **unet_params) -> torch.nn.Module:
    """Our UNetModel of `config` (a LatentDiffusion model config) with random weights."""
    unet_config = config.params.unet_config.copy()
    unet_config.params.update(unet_params)
    return randomized(instantiate_from_config(unet_config))


def diffusers_unet(config, unet: torch.nn.Module) -> UNet2DConditionModel:
    checkpoint = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    original = original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=None)
    reference = UNet2DConditionModel(**unet_config)
    reference.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config))
    return reference


def ours_vae(config) -> torch.nn.Module:
    return randomized(instantiate_from_config(config.params.first_stage_config)).eval()


def diffusers_vae(config, vae: torch.nn.Module) -> AutoencoderKL:
    checkpoint = {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original_config(config), checkpoint)
    reference = AutoencoderKL(**vae_config)
    reference.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config))
    return reference.eval()


def diffusers_ddim(model) -> DDIMScheduler:
    """The DDIM scheduler of a LatentDiffusion model's schedule and parameterisation."""
    prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[model.parameterization]
    return DDIMScheduler(
        num_train_timesteps=model.num_timesteps,
        trained_betas=model.betas.double().numpy(),
        prediction_type=prediction,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
