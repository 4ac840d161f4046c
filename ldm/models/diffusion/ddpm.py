"""DDPM and LatentDiffusion LightningModules: they wire the UNet, the process and the stages.

The math lives in `schedule.py`; these classes hold the networks, register the schedule
buffers under their original names (they are part of SD checkpoints) and compute the loss.
Ho et al. 2020 (DDPM); Rombach et al. 2022 (latent diffusion).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.checkpoint import (
    EMA_PREFIX,
    ORIGINAL_LAYOUT,
    filter_keys,
    load_strictly,
    read_state_dict,
    unet_weights,
)
from ldm.models.diffusion import previews, sampling, schedule
from ldm.models.diffusion.conditioning import (
    CONTEXT_KEY,
    MOMENTS_KEY,
    drop_cached_context,
    drop_conditioning,
    parse_ucg_training,
    resolve_conditioning_key,
)
from ldm.models.diffusion.loss import DiffusionLoss, check_self_conditioning_channels
from ldm.modules.acceleration import accelerate
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import (
    batch_item,
    channels_first,
    instantiate_from_config,
    make_optimizer,
    to_plain,
)

logger = logging.getLogger(__name__)

COMPAT_PARAMS = {
    "log_every_t": "the original's interval for logging its own sampler's intermediates; "
    "the samplers take `log_every_t` themselves",
    "concat_mode": "only picks the default conditioning_key when none is given, as the original",
}
CONDITIONING_KEYS = (None, "crossattn", "concat", "hybrid")
# The SD base learning rate; main.py overrides it from the config's base_learning_rate.
DEFAULT_LEARNING_RATE = 1.0e-4


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the checkpoint's `model.diffusion_model.` prefix)."""

    def __init__(self, diff_model_config: Mapping, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key {conditioning_key!r}; expected {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None):
        if self.conditioning_key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)  # (B, C + C_cond, H, W)
        context = None
        if self.conditioning_key in ("crossattn", "hybrid"):
            context = torch.cat(c_crossattn, dim=1)  # (B, L, D)
        return self.diffusion_model(x, t, context=context)


# Seeds the fixed noise of validation and test losses, so runs compare across resumes.
EVAL_SEED = 1234


class DDPM(pl.LightningModule):
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
    ):
        super().__init__()
        if conditioning_key not in self.supported_conditioning:
            raise NotImplementedError(
                f"{type(self).__name__}: conditioning_key {conditioning_key!r} is not supported "
                f"(supported: {self.supported_conditioning})"
            )
        betas = (
            schedule.make_beta_schedule(
                beta_schedule,
                timesteps,
                linear_start,
                linear_end,
                cosine_s,
                sigmoid_start=sigmoid_start,
                sigmoid_end=sigmoid_end,
                sigmoid_tau=sigmoid_tau,
            )
            if given_betas is None
            else torch.tensor(given_betas, dtype=torch.float64)
        )
        if zero_terminal_snr:
            betas = schedule.zero_snr_betas(betas, parameterization)
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
        self.parameterization, self.self_conditioning = parameterization, self_conditioning
        self.first_stage_key, self.image_size, self.channels = first_stage_key, image_size, channels
        self.monitor, self.scheduler_config = monitor, scheduler_config
        self.optimizer_config = optimizer_config
        self.learning_rate = DEFAULT_LEARNING_RATE
        if self_conditioning:
            check_self_conditioning_channels(unet_config, channels, conditioning_key)
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        accelerate(self.model.diffusion_model, "the UNet", channels_last, compile)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        # Sampling starts at t = T where the schedule reaches SNR 0 (Lin et al.'s "trailing").
        self.timestep_spacing = "trailing" if zero_terminal_snr else "uniform"
        self.register_schedule(betas, v_posterior)
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        self.learn_logvar = learn_logvar
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar, persistent=False)
        self.ignore_keys, self.load_only_unet = list(ignore_keys), load_only_unet
        self.keep_ckpt_ema = keep_ckpt_ema
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path)

    # The conditioning_key values this class trains and samples with end to end.
    supported_conditioning = (None,)

    def register_schedule(self, betas: torch.Tensor, v_posterior: float = 0.0) -> None:
        """Register the schedule buffers (original names, float32) computed from float64 betas."""
        self.num_timesteps = len(betas)
        buffers = schedule.schedule_buffers(betas, v_posterior)
        for name, value in buffers.items():
            self.register_buffer(name, value.float())
        self.schedule_keys = list(buffers)

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
        """
        ignore_keys = self.ignore_keys if ignore_keys is None else list(ignore_keys)
        only_model = self.load_only_unet if only_model is None else only_model
        state_dict = filter_keys(read_state_dict(path, unsafe_pickle=unsafe_pickle), ignore_keys)
        if only_model:
            target, state_dict = self.model, unet_weights(state_dict)
            expected = "a UNet: an original SD file's model.diffusion_model.* or diffusion_model.*"
        else:
            target, expected = self, ORIGINAL_LAYOUT
        optional = ignore_keys if only_model else [*ignore_keys, *self.computed_keys()]
        loaded = load_strictly(target, state_dict, str(path), optional, expected)
        self.after_loading(loaded if target is self else set(), path)

    def computed_keys(self) -> list[str]:
        """Keys a file may lack: the schedule (built from the config), the EMA (restarted) and
        LatentDiffusion's scale_factor (measured by scale_by_std)."""
        return [*self.schedule_keys, EMA_PREFIX, "scale_factor"]

    def after_loading(self, loaded: set[str], path) -> None:
        """Restart the EMA from the loaded weights, unless keep_ckpt_ema and the file has one."""
        if not self.use_ema:
            return
        if self.keep_ckpt_ema and any(k.startswith(EMA_PREFIX) for k in loaded):
            logger.info("%s: keeping its EMA (num_updates %d)", path, self.model_ema.num_updates)
            return
        self.model_ema.reset_from(self.model)
        logger.info("%s: the EMA starts from the loaded weights", path)

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Swap the EMA weights into the model inside the block, restoring them after."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        if context:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(self.model.parameters())

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
        return self.model(x_t, t, **(cond or {}))

    def p_losses(self, x0, cond, t, noise=None, prefix=None) -> tuple[torch.Tensor, dict]:
        """The training loss at timesteps t (`DiffusionLoss`) and the values to log."""

        def predict(x_t: torch.Tensor, t: torch.Tensor, self_cond) -> torch.Tensor:
            return self.apply_model(x_t, t, cond, self_cond)

        prefix = prefix or ("train" if self.training else "val")
        loss, logs = self.loss_fn(predict, x0, t, noise, self.logvar, self.training, prefix)
        if self.learn_logvar:
            logs["logvar"] = self.logvar.mean()
        return loss, logs

    def random_timesteps(self, n: int) -> torch.Tensor:
        """(n,) timesteps drawn uniformly from [0, T)."""
        return torch.randint(0, self.num_timesteps, (n,), device=self.device)

    def forward(self, x0: torch.Tensor, c, prefix: str | None = None) -> tuple[torch.Tensor, dict]:
        """The loss and logs at random timesteps, for inputs and conditioning from get_input."""
        return self.p_losses(x0, c, self.random_timesteps(x0.shape[0]), prefix=prefix)

    def shared_step(self, batch: Mapping, prefix: str | None = None) -> tuple[torch.Tensor, dict]:
        return self(*self.get_input(batch), prefix=prefix)

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
        """An optimizer step, then one EMA update: once per step under gradient accumulation."""
        super().optimizer_step(*args, **kwargs)
        if self.use_ema:
            self.model_ema(self.model)

    @torch.no_grad()
    def sample(
        self,
        cond,
        batch_size: int,
        steps: int = 50,
        guidance_scale: float = 1.0,
        uncond=None,
        eta: float = 0.0,
        x_T: torch.Tensor | None = None,
        generator=None,
        disable: bool = True,
        guidance_rescale: float = 0.0,
        sampler: str = "ddim",
    ) -> torch.Tensor:
        """Samples (B, channels, image_size, image_size) by `sampler`; guided when uncond is set.

        For LatentDiffusion these are latents, to decode with `decode_first_stage`.
        """
        return sampling.sample(
            self,
            cond,
            uncond,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            x_T=x_T,
            batch_size=batch_size,
            generator=generator,
            disable=disable,
        )

    @torch.no_grad()
    def log_images(self, batch: Mapping, n: int = 8, steps: int = 20) -> dict[str, object]:
        """Inputs and EMA samples, in [-1, 1], for the ImageLogger (`previews.py`)."""
        return previews.pixel_previews(self, batch, n, steps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the UNet, plus logvar when it is learned."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + ([self.logvar] if self.learn_logvar else [])

    def configure_optimizers(self):
        optimizer = make_optimizer(
            self.optimizer_config, self.trainable_parameters(), self.learning_rate
        )
        if self.scheduler_config is None:
            return optimizer
        lr_lambda = instantiate_from_config(self.scheduler_config).schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


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
        ckpt_path: str | None = None,
        ignore_keys: list[str] = (),
        load_only_unet: bool = False,
        **ddpm_params,
    ):
        if (num_timesteps_cond or 1) != 1:
            raise NotImplementedError("LatentDiffusion: num_timesteps_cond > 1 is not supported")
        key = resolve_conditioning_key(cond_stage_config, conditioning_key, concat_mode)
        super().__init__(
            conditioning_key=key,
            ignore_keys=ignore_keys,
            load_only_unet=load_only_unet,
            **ddpm_params,
        )
        self.cond_stage_key, self.cond_stage_forward = cond_stage_key, cond_stage_forward
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
        if ckpt_path is not None:  # last, so every module and buffer exists (unlike the original)
            self.init_from_ckpt(ckpt_path)

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
