"""SDXL's `DiffusionEngine` (Stability-AI/generative-models), built from its configs as a
LatentDiffusion: the same training loop, EMA, checkpoints and samplers as SD 1.x / 2.x.

Configs name it `ldm.models.diffusion.DiffusionEngine` (or `sgm.models.diffusion...`, see
`ldm.util.get_obj_from_str`). Its parts keep generative-models' names and state-dict keys:
`model.diffusion_model.*` (network_config), `first_stage_model.*`, `conditioner.embedders.*`
(a `GeneralConditioner`: its `crossattn` output is the context, its `vector` the UNet's
`y`) and `denoiser.sigmas`. The denoiser and loss configs are read into DDPM's schedule,
parameterization and loss weights (`DiscreteDenoiser.ddpm_params`,
`StandardDiffusionLoss.ddpm_params`), so DDPM's loss trains it and its samplers sample it.
Podell et al. 2023 (SDXL).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch
from torch import nn

from ldm.models.diffusion import previews
from ldm.models.diffusion.conditioning import (
    AESTHETIC_KEY,
    CONDITIONER_OUTPUT_KEY,
    CROP_KEY,
    MOMENTS_KEY,
    ORIGINAL_SIZE_KEY,
    TARGET_SIZE_KEY,
)
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.modules.conditioner import dropout_mask
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError, batch_item, instantiate_from_config, reject_unsupported

COMPAT_PARAMS = {
    "log_keys": "which conditionings generative-models draws as images; the ImageLogger "
    "writes the captions beside its grids",
    "no_cond_log": "see log_keys",
}
# The network wrappers that feed the UNet as DiffusionWrapper does (context, y).
OPENAI_WRAPPERS = frozenset(
    {
        None,
        "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper",
        "ldm.modules.diffusionmodules.wrappers.OpenAIWrapper",
    }
)
EMPTY_CONDITIONER = {"target": "ldm.modules.GeneralConditioner", "params": {"emb_models": []}}
TEXT_KEYS = ("txt", "caption")
# SDXL's micro-conditioning when a caller gives only prompts, as its sampling scripts default:
# the image's own size as original and target size, no crop, the refiner's aesthetic score 6.
SIZE_KEYS, DEFAULT_AESTHETIC = (ORIGINAL_SIZE_KEY, TARGET_SIZE_KEY), 6.0


def conditioning_key_of(network_config: Mapping) -> str | None:
    """The DiffusionWrapper conditioning of a generative-models UNet: a context_dim means
    cross-attention, num_classes a label vector y too."""
    params = network_config.get("params") or {}
    context, labels = params.get("context_dim") is not None, params.get("num_classes") is not None
    if labels and not context:
        raise NotImplementedError(
            "DiffusionEngine: a UNet with num_classes but no context_dim (class labels only) is "
            "not supported; SDXL's has both"
        )
    return ("crossattn-adm" if labels else "crossattn") if context else None


def check_options(sampler_config, network_wrapper, caption_dropout) -> None:
    """Raise, naming the param, on DiffusionEngine options not supported (yet) or out of range."""
    if not isinstance(caption_dropout, int | float) or not 0 <= caption_dropout <= 1:
        raise ConfigError(f"DiffusionEngine: caption_dropout {caption_dropout!r}: expected [0, 1]")
    reject_unsupported(
        "DiffusionEngine",
        {
            "sampler_config": (sampler_config, None),
            "network_wrapper": (network_wrapper, OPENAI_WRAPPERS),
        },
    )


class DiffusionEngine(LatentDiffusion):
    """generative-models' params, plus `caption_dropout` (see get_input) and LatentDiffusion's
    (`ldm_params`: EMA placement, LoRA, `image_size` of the latents the samplers start
    from, ...)."""

    supported_conditioning = (None, "crossattn", "crossattn-adm")
    # SDXL files hold no schedule buffers: `denoiser.sigmas` stands for the schedule.
    persistent_schedule = False
    original_layout = (
        "SDXL's layout (model.diffusion_model.*, first_stage_model.*, conditioner.embedders.*, "
        "denoiser.sigmas), as generative-models writes it"
    )

    def __init__(
        self,
        network_config: Mapping,
        denoiser_config: Mapping,
        first_stage_config: Mapping,
        conditioner_config: Mapping | None = None,
        sampler_config: Mapping | None = None,
        optimizer_config: Mapping | None = None,
        scheduler_config: Mapping | None = None,
        loss_fn_config: Mapping | None = None,
        network_wrapper: str | None = None,
        ckpt_path: str | None = None,
        use_ema: bool = False,
        ema_decay_rate: float = 0.9999,
        scale_factor: float = 1.0,
        disable_first_stage_autocast: bool = False,
        input_key: str = "jpg",
        log_keys: list[str] | None = None,
        no_cond_log: bool = False,
        compile_model: bool = False,
        en_and_decode_n_samples_a_time: int | None = None,
        caption_dropout: float = 0.0,
        **ldm_params,
    ):
        check_options(sampler_config, network_wrapper, caption_dropout)
        denoiser = instantiate_from_config(denoiser_config)
        loss_params = {}
        if loss_fn_config is not None:
            loss_params = instantiate_from_config(loss_fn_config).ddpm_params(denoiser)
        timestep_weights = loss_params.pop("timestep_weights", None)
        conditioner_config = conditioner_config or EMPTY_CONDITIONER
        ldm_params.setdefault("channels", first_stage_config["params"]["embed_dim"])
        ldm_params.setdefault("image_size", 128)  # SDXL's 1024 px
        super().__init__(
            first_stage_config=first_stage_config,
            cond_stage_config=conditioner_config,  # built as `conditioner`: make_cond_stage
            cond_stage_key=TEXT_KEYS[0],
            conditioning_key=conditioning_key_of(network_config),
            scale_factor=scale_factor,
            unet_config=network_config,
            ckpt_path=ckpt_path,
            use_ema=use_ema,
            ema_decay_rate=ema_decay_rate,
            first_stage_key=input_key,
            scheduler_config=scheduler_config,
            optimizer_config=optimizer_config,
            compile=compile_model,
            **denoiser.ddpm_params(),
            **loss_params,
            **ldm_params,
        )
        if timestep_weights is not None:
            self.loss_fn.weigh_timesteps(timestep_weights)
        self.denoiser = denoiser
        self.conditioner = instantiate_from_config(conditioner_config)
        self.lora, self.lora_specs = super().make_lora(self.lora_config)  # needs the conditioner
        if "text_encoder" in self.lora_specs:
            self.conditioner.adapted.update(self.conditioner.text_embedders())
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.chunk, self.caption_dropout = en_and_decode_n_samples_a_time, caption_dropout

    def make_cond_stage(self, config: Mapping | str) -> nn.Module | None:
        """No condition stage: the conditioner (built after DDPM) encodes the batch."""
        return None

    def make_lora(self, config: Mapping | None) -> tuple[None, dict]:
        """LoRA waits for the conditioner, whose text encoders it may adapt (`__init__`)."""
        self.lora_config = config
        return None, {}

    @property
    def encodes_in_forward(self) -> bool:
        """No: get_input's conditioner encodes, with gradients where the embedders train or
        carry adapters."""
        return False

    def computed_keys(self) -> list[str]:
        """The denoiser's sigmas come from the config: a file may lack them."""
        return [*super().computed_keys(), "denoiser."]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet's, and those of embedders with is_trainable."""
        embedders = (p for p in self.conditioner.parameters() if p.requires_grad)
        return [*super().trainable_parameters(), *embedders]

    def first_stage_autocast(self):
        """With disable_first_stage_autocast, the autoencoder runs in its own precision."""
        if not self.disable_first_stage_autocast:
            return nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x split along the batch into en_and_decode_n_samples_a_time items (or whole)."""
        return list(x.split(self.chunk)) if self.chunk else [x]

    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        with self.first_stage_autocast():
            parts = [super(DiffusionEngine, self).encode_first_stage(c) for c in self.chunks(x)]
        if len(parts) == 1:
            return parts[0]
        return DiagonalGaussianDistribution(torch.cat([p.parameters for p in parts]))

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        with self.first_stage_autocast():
            return torch.cat(
                [super(DiffusionEngine, self).decode_first_stage(c) for c in self.chunks(z)]
            )

    def get_input(self, batch: Mapping, key: str | None = None) -> tuple[torch.Tensor, object]:
        """(z, cond): the scaled latents and the conditioner's output for the batch (with its
        guidance dropout in training mode, and `caption_dropout`: each item's text zeroed in
        every text embedder at once, as kohya's caption dropout drops the caption). Size and
        crop entries the batch lacks are those of its images as they are (their own size, no
        crop): true of data neither resized nor cropped; data that resizes or crops must give
        them."""
        z = self.get_first_stage_encoding(self.first_stage_posterior(batch, key))
        kept = None
        if self.training and self.caption_dropout > 0:
            kept = self.text_mask(dropout_mask(len(z), self.caption_dropout, z.device))
        embedded = self.embedded(batch, z, self.training)
        return z, self.as_cond(self.conditioner.assemble(embedded, (), self.training, kept))

    def embedded(self, batch: Mapping, z: torch.Tensor, dropout: bool) -> list[list[torch.Tensor]]:
        """Each embedder's outputs for the batch: a latent cache's, else encoded now."""
        prefix = CONDITIONER_OUTPUT_KEY + "."
        cached = {
            tuple(int(n) for n in key.removeprefix(prefix).split(".")): value
            for key, value in batch.items()
            if key.startswith(prefix)
        }  # {(embedder, output): (B, ...)}
        if not cached:
            return self.conditioner.embed(self.with_sizes(batch, z), dropout)
        indices = range(len(self.conditioner.embedders))
        return [[v for (e, _), v in sorted(cached.items()) if e == i] for i in indices]

    @torch.no_grad()
    def cache_entries(self, batch: Mapping, moments: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a latent cache stores of the batch for this model: each embedder's outputs
        (with the size and crop entries of `moments`' latents where the batch has none)."""
        embedded = self.conditioner.embed(self.with_sizes(batch, moments), dropout=False)
        return {
            f"{CONDITIONER_OUTPUT_KEY}.{i}.{j}": out.float().cpu()
            for i, outputs in enumerate(embedded)
            for j, out in enumerate(outputs)
        }

    def with_sizes(self, batch: Mapping, z: torch.Tensor) -> dict:
        """The batch with the size and crop entries it lacks, those of its latents' images."""
        size = (z.shape[-2] * self.latent_factor, z.shape[-1] * self.latent_factor)
        return {**self.micro_conditioning(len(z), size), **batch}

    @property
    def latent_factor(self) -> int:
        """How many pixels one latent spans per side."""
        return 2 ** (len(self.first_stage_model.encoder.down) - 1)

    def as_cond(self, out: Mapping[str, torch.Tensor]) -> dict | None:
        """The conditioner's {crossattn, vector} as DiffusionWrapper's {c_crossattn, c_adm}."""
        key = self.model.conditioning_key
        needs = {None: set(), "crossattn": {"crossattn"}, "crossattn-adm": {"crossattn", "vector"}}
        if set(out) != needs[key]:
            raise ConfigError(
                f"DiffusionEngine: the conditioner gives {sorted(out)}, but the UNet takes "
                f"{sorted(needs[key])} (context_dim: crossattn, num_classes: vector)"
            )
        if key is None:
            return None
        cond = {"c_crossattn": [out["crossattn"]]}
        return cond | ({"c_adm": out["vector"]} if "vector" in out else {})

    def micro_conditioning(self, n: int, size: tuple[int, int] | None = None, **given) -> dict:
        """The size, crop and score entries the conditioner reads, for n images of `size`
        (height, width; by default the latents' image_size times the first stage's factor),
        as SDXL's scripts default them unless `given` (batch keys: `crop_coords_top_left`
        (top, left), ...)."""
        if size is None:
            size = (self.image_size * self.latent_factor,) * 2
        defaults = {key: tuple(size) for key in SIZE_KEYS}
        entries = defaults | {CROP_KEY: (0, 0), AESTHETIC_KEY: DEFAULT_AESTHETIC} | given
        wanted = {key for spec in self.conditioner.specs for key in spec.input_keys}
        return {
            key: torch.tensor([value] * n, dtype=torch.float, device=self.device)
            for key, value in entries.items()
            if key in wanted
        }

    @torch.no_grad()
    def get_learned_conditioning(self, c, size: tuple[int, int] | None = None, **micro):
        """The conditioning of prompts for images of `size`, with SDXL's `micro` entries (see
        micro_conditioning); an empty prompt's text embeddings are zeros, SDXL's
        unconditional text."""
        prompts = [c] if isinstance(c, str) else list(c)
        batch = {TEXT_KEYS[0]: prompts, **self.micro_conditioning(len(prompts), size, **micro)}
        written = torch.tensor([p != "" for p in prompts])
        return self.as_cond(self.conditioner(batch, dropout=False, kept=self.text_mask(written)))

    def text_mask(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """A (B,) mask for the text embedders, under whichever caption key they read."""
        return dict.fromkeys(TEXT_KEYS, mask)

    @torch.no_grad()
    def log_images(
        self, batch: Mapping, n: int = 8, steps: int = 20, guidance_scale: float = 3.0
    ) -> dict[str, object]:
        """Inputs, reconstructions and EMA samples for the batch's own conditioning, unguided
        and guided against the same batch with its text zeroed."""
        batch = {k: v[:n] for k, v in batch.items()}
        z = self.get_first_stage_encoding(self.first_stage_posterior(batch))
        images = {} if MOMENTS_KEY in batch else {"inputs": self.batch_images(batch)}
        images["reconstructions"] = self.decode_first_stage(z)
        embedded = self.embedded(batch, z, dropout=False)
        cond = self.as_cond(self.conditioner.assemble(embedded))
        with self.ema_scope():
            if cond is None:
                images["samples"] = self.decode_first_stage(self.sample(None, len(z), steps))
                return images
            uncond = self.as_cond(self.conditioner.assemble(embedded, TEXT_KEYS))
            images.update(
                previews.guided_samples(
                    self, cond, uncond, len(z), steps, guidance_scale, z.shape[1:]
                )
            )
        if not self.reads_text:
            return images
        return {"captions": list(batch_item(batch, TEXT_KEYS[0])), **images}

    @property
    def reads_text(self) -> bool:
        """Whether an embedder of the conditioner reads the captions."""
        return any(key in TEXT_KEYS for spec in self.conditioner.specs for key in spec.input_keys)
