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

from ldm.models.diffusion import previews
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
from ldm.util import batch_item, instantiate_from_config, to_plain

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

    # Concat and hybrid conditioning (SD's inpainting and upscaling models) are not built yet.
    supported_conditioning = (None, "crossattn")

    def after_loading(self, loaded: set[str], path) -> None:
        super().after_loading(loaded, path)
        if "scale_factor" in loaded:  # the file's, kept: fine-tunes keep their latent scale
            self._rescale_pending = False

    def make_cond_stage(self, config: Mapping | str) -> nn.Module | None:
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
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior) -> torch.Tensor:
        """A latent sample, scaled by scale_factor to roughly unit variance."""
        z = posterior.sample() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) back to images (B, 3, 8h, 8w)."""
        return self.first_stage_model.decode(z / self.scale_factor)

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
        c = batch_item(batch, self.cond_stage_key)
        ucg = self.ucg_training.get(self.cond_stage_key) if self.training else None
        if CONTEXT_KEY in batch and not self.cond_stage_trainable:
            c = batch[CONTEXT_KEY]
            if ucg is not None:
                c = drop_cached_context(c, ucg["p"], self.constant_context(ucg["val"]))
            return z, c
        if ucg is not None:
            c = drop_conditioning(c, **ucg)
        if not self.cond_stage_trainable:
            with torch.no_grad():
                c = self.get_learned_conditioning(c)
        return z, c

    @torch.no_grad()
    def constant_context(self, caption: str) -> torch.Tensor:
        """The frozen text encoder's (1, L, D) output for one caption, computed once."""
        if caption not in self.constant_contexts:
            self.constant_contexts[caption] = self.get_learned_conditioning([caption])
        return self.constant_contexts[caption]

    def forward(self, z: torch.Tensor, c, prefix: str | None = None) -> tuple[torch.Tensor, dict]:
        if self.cond_stage_trainable and c is not None:  # encoded here, with gradients
            c = self.get_learned_conditioning(c)
        return super().forward(z, c, prefix)

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
        return params
