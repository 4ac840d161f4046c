"""DDPM, the LightningModule every diffusion model here builds on: UNet, schedule, loss, EMA.

The math lives in `schedule.py` and the loss in `loss.py`; DDPM holds the UNet, registers the
schedule buffers under their original names (they are part of SD checkpoints), trains and
samples. LatentDiffusion (`latent.py`) keeps its original path, `ldm.models.diffusion.ddpm`.
Ho et al. 2020 (DDPM).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.checkpoint import (
    EMA_PREFIX,
    ORIGINAL_LAYOUT,
    filter_keys,
    load_strictly,
    unet_weights,
)
from ldm.diffusers_layout import read_weights
from ldm.models.diffusion import previews, sampling, schedule
from ldm.models.diffusion.conditioning import (
    LOSS_MASK_KEY,
    LOSS_WEIGHT_KEY,
    MOMENTS_KEY,
    DiffusionWrapper,
)
from ldm.models.diffusion.loss import DiffusionLoss, check_self_conditioning_channels
from ldm.modules.acceleration import accelerate
from ldm.modules.ema import LitEma, ema_options
from ldm.util import (
    batch_item,
    channels_first,
    instantiate_from_config,
    make_optimizer,
    to_dtype_of,
)

logger = logging.getLogger(__name__)

COMPAT_PARAMS = {
    "log_every_t": "the original's interval for logging its own sampler's intermediates; "
    "the samplers take `log_every_t` themselves",
    "concat_mode": "only picks the default conditioning_key when none is given, as the original",
}
DEFAULT_LEARNING_RATE = 1.0e-4  # SD's base learning rate

# Seeds the fixed noise of validation and test losses, so runs compare across resumes.
EVAL_SEED = 1234


class WeightsSource(NamedTuple):
    """Where a model's first weights come from: the config's ckpt_path and how to read it."""

    path: str | None
    ignore_keys: list[str]
    only_unet: bool  # load_only_unet
    keep_ema: bool  # keep_ckpt_ema


class BuildsThenLoads(type(pl.LightningModule)):
    """Calls `after_construction` once the outermost constructor has returned.

    Subclasses (LatentDiffusion, adapters, a model that adds inputs) build modules after
    DDPM.__init__; only then is it known what trains (the EMA's subject) and does every key of
    the config's ckpt_path have its place. One site for all of them.
    """

    def __call__(cls, *args, **kwargs):
        model = super().__call__(*args, **kwargs)
        model.after_construction()
        return model


class DDPM(pl.LightningModule, metaclass=BuildsThenLoads):
    """Diffusion on pixels: `p_losses` trains the UNet to predict eps, x0 or v."""

    def __init__(
        self,
        unet_config: Mapping,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: list[str] = (),
        load_only_unet: bool = False,
        keep_ckpt_ema: bool = False,
        monitor: str | None = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
        given_betas: list[float] | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Mapping | None = None,
        optimizer_config: Mapping | None = None,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        min_snr_gamma: float | None = None,
        zero_terminal_snr: bool = False,
        self_conditioning: bool = False,
        offset_noise_strength: float = 0.0,
        immiscible: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        ema_device: str | None = None,
        ema_update_every: int = 1,
        ema_decay_rate: float = 0.9999,
    ):
        super().__init__()
        self.check_conditioning(conditioning_key)
        betas = schedule.model_betas(
            beta_schedule,
            timesteps,
            given_betas,
            zero_terminal_snr,
            parameterization,
            linear_start=linear_start,
            linear_end=linear_end,
            cosine_s=cosine_s,
            sigmoid_start=sigmoid_start,
            sigmoid_end=sigmoid_end,
            sigmoid_tau=sigmoid_tau,
        )
        self.loss_fn = DiffusionLoss(
            betas,
            parameterization,
            loss_type,
            min_snr_gamma,
            l_simple_weight,
            original_elbo_weight,
            self_conditioning,
            offset_noise_strength,
            immiscible,
        )
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.monitor = monitor
        self.scheduler_config = scheduler_config
        self.optimizer_config = optimizer_config
        self.model = self.make_model(unet_config, conditioning_key, channels_last, compile)
        self.use_ema = use_ema  # the EMA is built after construction: `after_construction`
        self.ema_options = ema_options(ema_device, ema_update_every, ema_decay_rate)
        self.timestep_spacing = "trailing" if zero_terminal_snr else "uniform"  # from SNR 0
        self.register_schedule(betas, v_posterior)
        self.register_logvar(logvar_init, learn_logvar)
        self.weights = WeightsSource(ckpt_path, list(ignore_keys), load_only_unet, keep_ckpt_ema)

    # The conditioning_key values this class trains and samples with end to end.
    supported_conditioning = (None,)
    # main.py sets learning_rate (base_learning_rate); SD files hold the schedule buffers.
    learning_rate = DEFAULT_LEARNING_RATE
    original_layout, persistent_schedule = ORIGINAL_LAYOUT, True

    @property
    def parameterization(self) -> str:
        """What the UNet predicts: eps, x0 or v."""
        return self.loss_fn.parameterization

    @property
    def self_conditioning(self) -> bool:
        """Whether the UNet takes an x0 estimate as extra input channels (Chen et al. 2022)."""
        return self.loss_fn.self_conditioning

    def check_conditioning(self, conditioning_key: str | None) -> None:
        if conditioning_key not in self.supported_conditioning:
            raise NotImplementedError(
                f"{type(self).__name__}: conditioning_key {conditioning_key!r} is not supported "
                f"(supported: {self.supported_conditioning})"
            )

    def make_model(
        self, unet_config: Mapping, conditioning_key: str | None, channels_last: bool, compile: bool
    ) -> DiffusionWrapper:
        """The UNet, wrapped under the checkpoint's `model.diffusion_model.` prefix."""
        if self.self_conditioning:
            check_self_conditioning_channels(unet_config, self.channels, conditioning_key)
        model = DiffusionWrapper(unet_config, conditioning_key)
        accelerate(model.diffusion_model, "the UNet", channels_last, compile)
        return model

    def register_schedule(self, betas: torch.Tensor, v_posterior: float = 0.0) -> None:
        """Register the schedule buffers (original names, float32) computed from float64 betas."""
        self.num_timesteps = len(betas)
        buffers = schedule.schedule_buffers(betas, v_posterior)
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=self.persistent_schedule)
        self.schedule_keys = list(buffers)

    def register_logvar(self, logvar_init: float, learn_logvar: bool) -> None:
        """logvar (T,): the per-timestep log variance of the loss, a parameter when learned."""
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        self.learn_logvar = learn_logvar
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar, persistent=False)

    def after_construction(self) -> None:
        """The EMA of what trains, then the config's ckpt_path; `BuildsThenLoads` calls it."""
        if self.use_ema:
            self.model_ema = LitEma(self.ema_target(), **self.ema_options)
        if self.weights.path is not None:
            self.init_from_ckpt(self.weights.path)

    def ema_target(self) -> nn.Module:
        """The module whose trainable weights the EMA follows: the UNet (DiffusionWrapper)."""
        return self.model

    def init_from_ckpt(
        self,
        path: str,
        ignore_keys=None,
        only_model: bool | None = None,
        *,
        unsafe_pickle: bool = False,
    ) -> None:
        """Load weights into the fully built model, strictly (`checkpoint.load_strictly`).

        The file must hold every weight except what the model computes or restarts itself
        (`computed_keys`) and what starts with an `ignore_keys` prefix (those keep their built
        values); with `only_model` (load_only_unet) only the UNet is taken. The EMA restarts
        from the loaded weights (num_updates 0), unless keep_ckpt_ema keeps the file's own.
        `path` may be a diffusers folder, converted to this model's keys (`diffusers_layout`).
        """
        ignore_keys = self.weights.ignore_keys if ignore_keys is None else list(ignore_keys)
        only_model = self.weights.only_unet if only_model is None else only_model
        state_dict = read_weights(path, self, only_unet=only_model, unsafe_pickle=unsafe_pickle)
        state_dict = filter_keys(state_dict, [*ignore_keys, *self.keys_without_place()])
        state_dict = self.adapt_weights(state_dict, str(path))
        if only_model:
            target, state_dict = self.model, unet_weights(state_dict)
            expected = "a UNet: an original SD file's model.diffusion_model.* or diffusion_model.*"
        else:
            target, expected = self, self.original_layout
        optional = ignore_keys if only_model else [*ignore_keys, *self.computed_keys()]
        loaded = load_strictly(target, state_dict, str(path), optional, expected)
        self.after_loading(loaded if target is self else set(), path)

    def keys_without_place(self) -> list[str]:
        """Prefixes of a file's keys that this model leaves out on purpose (none here)."""
        return []

    def adapt_weights(self, state_dict: dict, path: str) -> dict:
        """A file's weights made to fit this model (as they are here; inpainting widens them)."""
        return state_dict

    def computed_keys(self) -> list[str]:
        """Keys a file may lack: the schedule, the EMA (restarted) and scale_factor (measured)."""
        return [*self.schedule_keys, EMA_PREFIX, "scale_factor"]

    def after_loading(self, loaded: set[str], path) -> None:
        """Restart the EMA from the loaded weights, unless keep_ckpt_ema and the file has one."""
        if not self.use_ema:
            return
        if self.weights.keep_ema and any(k.startswith(EMA_PREFIX) for k in loaded):
            logger.info("%s: keeping its EMA (num_updates %d)", path, self.model_ema.num_updates)
            return
        self.model_ema.reset_from(self.ema_target())
        logger.info("%s: the EMA starts from the loaded weights", path)

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Swap the EMA weights into the model inside the block, restoring them after."""
        if not self.use_ema:
            yield
            return
        with self.model_ema.swapped_into(self.ema_target()):
            if context:
                logger.info("%s: switched to EMA weights", context)
            yield

    def batch_images(self, batch: Mapping, key: str | None = None) -> torch.Tensor:
        """Images (B, H, W, C) in [-1, 1] from the batch (first_stage_key) as (B, C, H, W)."""
        return channels_first(batch_item(batch, key or self.first_stage_key))

    def get_input(self, batch: Mapping, key: str | None = None) -> tuple[torch.Tensor, object]:
        """(x0, c): what the diffusion runs on and its conditioning; pixels and none here."""
        return self.batch_images(batch, key), None

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond=None, self_cond=None):
        """The UNet's prediction at (x_t, t); cond: a tensor, a list, or {c_concat, c_crossattn}.

        With self-conditioning, `self_cond` (an x0 estimate, zeros when None) rides along as
        extra input channels (Chen et al. 2022).
        """
        if self.self_conditioning:
            x_t = torch.cat([x_t, torch.zeros_like(x_t) if self_cond is None else self_cond], 1)
        if cond is not None and not isinstance(cond, Mapping):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        x_t, cond = to_dtype_of(self.model, x_t), to_dtype_of(self.model, cond or {})
        return self.model(x_t, t, **cond)

    def p_losses(self, x0, cond, t, noise=None, prefix=None, weights=None, mask=None) -> tuple:
        """The training loss at timesteps t (`DiffusionLoss`) and the values to log; `weights`
        (B,) weigh the items (the batch's `loss_weight`, e.g. DreamBooth's class images) and
        `mask` (B, 1, H, W) the pixels (the batch's `loss_mask`)."""

        def predict(x_t: torch.Tensor, t: torch.Tensor, self_cond) -> torch.Tensor:
            return self.apply_model(x_t, t, cond, self_cond)

        prefix = prefix or ("train" if self.training else "val")
        loss, logs = self.loss_fn(
            predict, x0, t, noise, self.logvar, self.training, prefix, weights, mask
        )
        if self.learn_logvar:
            logs["logvar"] = self.logvar.mean()
        return loss, logs

    def random_timesteps(self, n: int) -> torch.Tensor:
        """(n,) timesteps drawn uniformly from [0, T)."""
        return torch.randint(0, self.num_timesteps, (n,), device=self.device)

    def forward(self, x0, c, prefix=None, weights=None, mask=None) -> tuple[torch.Tensor, dict]:
        """The loss and logs at random timesteps, for inputs and conditioning from get_input."""
        t = self.random_timesteps(x0.shape[0])
        return self.p_losses(x0, c, t, prefix=prefix, weights=weights, mask=mask)

    def shared_step(self, batch: Mapping, prefix: str | None = None) -> tuple[torch.Tensor, dict]:
        weights = batch.get(LOSS_WEIGHT_KEY)  # per item, from ldm.data.mix.DataMix
        mask = batch.get(LOSS_MASK_KEY)  # per pixel, (B, H, W, 1)
        mask = mask if mask is None else channels_first(mask)
        return self(*self.get_input(batch), prefix=prefix, weights=weights, mask=mask)

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        loss, logs = self.shared_step(batch)
        self.log_dict(logs, prog_bar=True, on_step=True, batch_size=self.batch_size(batch))
        lr = self.optimizers().param_groups[0]["lr"] if self._trainer is not None else None
        if lr is not None:
            self.log("lr_abs", lr, prog_bar=True, on_step=True, batch_size=1)
        return loss

    @torch.no_grad()
    def evaluation_loss(self, batch: Mapping, batch_idx: int, prefix: str) -> dict:
        """Losses with noise and timesteps fixed per batch index, leaving the global RNG alone."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVAL_SEED + batch_idx)
            return self.shared_step(batch, prefix)[1]

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        logs = self.evaluation_loss(batch, batch_idx, "val")
        if self.use_ema:
            with self.ema_scope():
                logs_ema = self.evaluation_loss(batch, batch_idx, "val")
            logs.update({f"{k}_ema": v for k, v in logs_ema.items()})
        self.log_dict(logs, on_epoch=True, batch_size=self.batch_size(batch))

    def test_step(self, batch: Mapping, batch_idx: int) -> None:
        with self.ema_scope():
            logs = self.evaluation_loss(batch, batch_idx, "test")
        self.log_dict(logs, on_epoch=True, batch_size=self.batch_size(batch))

    def batch_size(self, batch: Mapping) -> int:
        return len(
            batch[MOMENTS_KEY] if MOMENTS_KEY in batch else batch_item(batch, self.first_stage_key)
        )

    def optimizer_step(self, *args, **kwargs) -> None:
        """An optimizer step, then the EMA follows it (moving every ema_update_every steps)."""
        super().optimizer_step(*args, **kwargs)
        if self.use_ema:
            self.model_ema(self.ema_target())

    @torch.no_grad()
    def sample(
        self,
        cond,
        batch_size: int,
        steps: int = 50,
        guidance_scale: float = 1.0,
        uncond=None,
        **options,
    ) -> torch.Tensor:
        """Samples (B, channels, image_size, image_size); guided when uncond is set.

        `options` are `sampling.sample`'s: sampler (ddim, plms, dpm), eta, x_T, generator,
        guidance_rescale, disable. For LatentDiffusion these are latents, to decode with
        `decode_first_stage`.
        """
        return sampling.sample(
            self,
            cond,
            uncond,
            steps=steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            **options,
        )

    @torch.no_grad()
    def log_images(self, batch: Mapping, n: int = 8, steps: int = 20) -> dict[str, object]:
        """Inputs and EMA samples, in [-1, 1], for the ImageLogger (`previews.py`)."""
        return previews.pixel_previews(self, batch, n, steps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the UNet, plus logvar when it is learned."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + ([self.logvar] if self.learn_logvar else [])

    def optimizer_groups(self) -> list:
        """The optimizer's parameters (or parameter groups): everything trainable."""
        return self.trainable_parameters()

    def configure_optimizers(self):
        optimizer = make_optimizer(
            self.optimizer_config, self.optimizer_groups(), self.learning_rate
        )
        if self.scheduler_config is None:
            return optimizer
        lr_lambda = instantiate_from_config(self.scheduler_config).schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


# The original module's classes that live elsewhere here (built on DDPM: imported on use).
MOVED = {
    "LatentDiffusion": "ldm.models.diffusion.latent",
    "LatentFinetuneDiffusion": "ldm.models.diffusion.inpainting",
    "LatentInpaintDiffusion": "ldm.models.diffusion.inpainting",
    "LatentUpscaleDiffusion": "ldm.models.diffusion.upscale",
}


def __getattr__(name: str):
    """`ldm.models.diffusion.ddpm.LatentDiffusion` and MOVED's others, the configs' targets."""
    if name in MOVED:
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
