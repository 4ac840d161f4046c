"""LatentDiffusion: DDPM in the latent space of a frozen autoencoder, conditioned by a text encoder.

Configs name it by its original path, `ldm.models.diffusion.ddpm.LatentDiffusion`, which
resolves here. It wires the stages: the first stage encodes images to latents (or a latent
cache hands them in), the condition stage encodes captions (dropped for classifier-free
guidance by `conditioning.py`), and DDPM's loss trains the UNet on them. Rombach et al. 2022.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ldm.checkpoint import EMA_PREFIX, LORA_PREFIX
from ldm.models.diffusion import adapters, previews
from ldm.models.diffusion.conditioning import (
    CONTEXT_KEY,
    MOMENTS_KEY,
    drop_cached_context,
    drop_conditioning,
    parse_ucg_training,
    resolve_conditioning_key,
)
from ldm.models.diffusion.ddpm import DDPM
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.lora import LoRANetwork
from ldm.util import ConfigError, batch_item, instantiate_from_config, to_dtype_of, to_plain

logger = logging.getLogger(__name__)


def frozen(module: nn.Module) -> nn.Module:
    """`module` in eval mode with gradients off (LatentDiffusion.train keeps it in eval)."""
    module.eval()
    module.requires_grad_(False)
    return module


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen autoencoder, conditioned by a text encoder."""

    def __init__(
        self,
        first_stage_config: Mapping,
        cond_stage_config: Mapping | str,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        ucg_training: Mapping | None = None,
        lora_config: Mapping | None = None,
        **ddpm_params,
    ):
        if (num_timesteps_cond or 1) != 1:
            raise NotImplementedError("LatentDiffusion: num_timesteps_cond > 1 is not supported")
        key = resolve_conditioning_key(cond_stage_config, conditioning_key, concat_mode)
        super().__init__(conditioning_key=key, **ddpm_params)
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = cond_stage_forward
        self.cond_stage_trainable = cond_stage_trainable
        self.ucg_training = parse_ucg_training(ucg_training)
        self.constant_contexts: dict[str, torch.Tensor] = {}  # see constant_context
        self.scale_by_std = scale_by_std
        self._rescale_pending = scale_by_std  # until measured, or loaded from a checkpoint
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = scale_factor
        # What decides a latent cache's contents besides the weights (ldm/data/cache.py).
        self.cache_identity = {
            "first_stage": to_plain(first_stage_config),
            "cond_stage": to_plain(cond_stage_config),
            "keys": [self.first_stage_key, cond_stage_key, cond_stage_forward],
        }
        self.first_stage_model = frozen(instantiate_from_config(first_stage_config))
        self.cond_stage_model = self.make_cond_stage(cond_stage_config)
        self.lora, self.lora_specs = self.make_lora(lora_config)

    # Text (crossattn), an image's channels (concat: an image-conditioned LDM), or both (hybrid:
    # SD's inpainting models, `inpainting.py`); the class-label keys are the upscaler's.
    supported_conditioning = (None, "crossattn", "concat", "hybrid")

    def after_loading(self, loaded: set[str], path) -> None:
        super().after_loading(loaded, path)
        if "scale_factor" in loaded:  # the file's, kept: fine-tunes keep their latent scale
            self._rescale_pending = False

    def make_cond_stage(self, config: Mapping | str) -> nn.Module | None:
        """The condition stage; `__is_first_stage__`: the first stage itself, as the original
        (so its keys appear under both prefixes), encoding conditioning images to latents."""
        if config == "__is_first_stage__":
            if self.cond_stage_trainable:
                raise ConfigError("cond_stage_config __is_first_stage__ cannot be trainable")
            return self.first_stage_model
        model = instantiate_from_config(config)
        if model is None or not self.cond_stage_trainable:
            return model if model is None else frozen(model)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"cond_stage_trainable: true, but the condition stage {type(model).__name__} "
                "is frozen, so nothing of it would train: set cond_stage_config.params.freeze: "
                "false, or cond_stage_trainable: false"
            )
        return model

    def make_lora(self, config: Mapping | None) -> tuple[LoRANetwork | None, dict]:
        """LoRA adapters (`adapters.py`) on the frozen UNet and text encoder, if configured."""
        if config is None:
            return None, {}
        if self.cond_stage_trainable:
            raise ConfigError(
                "lora_config with cond_stage_trainable: true would train the whole text encoder "
                "besides its adapters: set cond_stage_trainable: false (lora_config.text_encoder "
                "adapts it)"
            )
        self.model.requires_grad_(False)
        return adapters.build_lora(self, config)

    def ema_target(self) -> nn.Module:
        """With LoRA the EMA follows the adapters (the base is frozen), else the UNet."""
        return self.model if self.lora is None else self.lora

    def keys_without_place(self) -> list[str]:
        """With LoRA a base file's UNet EMA has no place: the EMA follows the adapters."""
        return [EMA_PREFIX] if self.lora is not None else []

    def computed_keys(self) -> list[str]:
        """A base file has no adapters: they start fresh (`lora.*`)."""
        return [*super().computed_keys(), *([LORA_PREFIX] if self.lora is not None else [])]

    @property
    def encodes_in_forward(self) -> bool:
        """Whether captions are encoded with gradients: a trainable or adapted text encoder."""
        return self.cond_stage_trainable or "text_encoder" in self.lora_specs

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """With LoRA, keep the adapters (and their EMA), not another copy of the frozen base:
        the base comes from the config's ckpt_path (or the run seed) again on resume."""
        if self.lora is not None:
            kept = (LORA_PREFIX, EMA_PREFIX, "scale_factor")
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if k.startswith(kept)
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """An adapter checkpoint's base weights are the ones this model was built with."""
        if self.lora is not None:
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Train the UNet; the frozen stages stay in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    def get_learned_conditioning(self, c):
        """Encode raw conditioning (e.g. a list of captions) with the condition stage."""
        model = self.cond_stage_model
        if self.cond_stage_forward is not None:
            return getattr(model, self.cond_stage_forward)(c)
        if callable(getattr(model, "encode", None)):
            c = model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return model(c)

    def encode_first_stage(self, x: torch.Tensor):
        """Images (B, 3, H, W) to the first stage's posterior over latents."""
        return self.first_stage_model.encode(to_dtype_of(self.first_stage_model, x))

    def get_first_stage_encoding(self, posterior) -> torch.Tensor:
        """A latent sample, scaled by scale_factor to roughly unit variance."""
        z = posterior.sample() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) back to images (B, 3, 8h, 8w)."""
        return self.first_stage_model.decode(
            to_dtype_of(self.first_stage_model, z / self.scale_factor)
        )

    def first_stage_posterior(self, batch: Mapping, key: str | None = None):
        """The posterior over the batch's latents: encoded, or read from a latent cache."""
        if MOMENTS_KEY in batch:
            return DiagonalGaussianDistribution(batch[MOMENTS_KEY])
        with torch.no_grad():
            return self.encode_first_stage(self.batch_images(batch, key))

    def get_input(self, batch: Mapping, key: str | None = None) -> tuple[torch.Tensor, object]:
        """(z, c): scaled first-stage latents and the conditioning (encoded unless trainable).

        A batch from a latent cache carries the posterior and the text encoder's output; the
        captions it drops for classifier-free guidance then get the cached `val`'s context.
        """
        z = self.get_first_stage_encoding(self.first_stage_posterior(batch, key))
        if self.cond_stage_model is None:
            return z, None
        c = self.condition_input(batch)
        ucg = self.ucg_training.get(self.cond_stage_key) if self.training else None
        if CONTEXT_KEY in batch and not self.encodes_in_forward:
            c = batch[CONTEXT_KEY]
            if ucg is not None:
                c = drop_cached_context(c, ucg["p"], self.constant_context(ucg["val"]), ucg["val"])
            return z, c
        if ucg is not None:
            c = drop_conditioning(c, **ucg)
        if not self.encodes_in_forward:
            with torch.no_grad():
                c = self.get_learned_conditioning(c)
        return z, c

    def condition_input(self, batch: Mapping):
        """The batch's `cond_stage_key` entry: captions as they are, an image (B, H, W, C) as
        (B, C, H, W) (the original's rule: a conditioning image for the condition stage)."""
        c = batch_item(batch, self.cond_stage_key)
        if isinstance(c, torch.Tensor) and c.ndim == 4:
            return self.batch_images(batch, self.cond_stage_key).to(self.device)
        return c

    @torch.no_grad()
    def constant_context(self, caption: str) -> torch.Tensor:
        """The frozen text encoder's (1, L, D) output for one caption, computed once."""
        if caption not in self.constant_contexts:
            self.constant_contexts[caption] = self.get_learned_conditioning([caption])
        return self.constant_contexts[caption]

    def forward(self, z, c, prefix=None, weights=None, mask=None) -> tuple[torch.Tensor, dict]:
        if self.encodes_in_forward and c is not None:  # encoded here, with gradients
            c = self.get_learned_conditioning(c)
        return super().forward(z, c, prefix, weights, mask)

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping, batch_idx: int) -> None:
        """With scale_by_std, set scale_factor = 1 / std of the first batch's latents."""
        if not (self._rescale_pending and self.global_step == 0 and batch_idx == 0):
            return
        std = self.first_stage_posterior(batch).sample().flatten().std()
        if self._trainer is not None:
            std = self.trainer.strategy.reduce(std, reduce_op="mean")
        self.scale_factor.fill_(1.0 / std)
        self._rescale_pending = False
        logger.info("scale_by_std: scale_factor set to %.5f", self.scale_factor.item())

    @torch.no_grad()
    def log_images(
        self, batch: Mapping, n: int = 8, steps: int = 20, guidance_scale: float = 3.0
    ) -> dict[str, object]:
        """Inputs, reconstructions and EMA samples for the ImageLogger (`previews.py`)."""
        return previews.latent_previews(self, batch, n, steps, guidance_scale)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        if self.lora is not None:
            params += list(self.lora.parameters())
        return params

    def optimizer_groups(self) -> list:
        """With LoRA, one group per adapted part, at the part's own learning rate if given."""
        if self.lora is None:
            return super().optimizer_groups()
        groups = adapters.param_groups(self.lora, self.lora_specs)
        return groups + ([{"params": [self.logvar], "name": "logvar"}] if self.learn_logvar else [])
