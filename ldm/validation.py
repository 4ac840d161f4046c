"""Fixed validation prompts, sampled every N steps from fixed start noise as labelled grids.

What fine-tuning users judge a run by: the same prompts from the same noise at every
evaluation, so that only the weights change from one grid to the next, with the EMA weights
beside the raw ones. Sampling goes through `sampling.sample`, as txt2img.py's does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.callbacks import log_image, to_uint8_grid
from ldm.inference import latent_factor
from ldm.models.diffusion import sampling
from ldm.strategies import refuse_rank_zero_sampling
from ldm.util import ConfigError, to_plain

logger = logging.getLogger(__name__)

FOLDER = Path("images") / "validation"  # under the run's log dir, beside ImageLogger's
MIN_TILE = 128  # px: smaller samples (the tiny model's 32 px) are enlarged so labels fit
FONT_SIZE = 14
LABEL_PAD = 4  # px around a label's text
WHERE = "ValidationPrompts"


def start_noise(
    seed: int, n: int, shape: Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(n, C, h, w) noise from a CPU generator seeded with `seed`: the same on any device and
    whatever the global RNG's state."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=generator).to(device, dtype)


def wrap_to_width(text: str, width: float, font: ImageFont.FreeTypeFont) -> list[str]:
    """`text` broken between words into lines no wider than `width` px (a longer word
    gets a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line]


def label_strip(text: str, width: int, font: ImageFont.FreeTypeFont) -> np.ndarray:
    """(h, width, 3) uint8: black `text` on white, on as many lines as it needs."""
    lines = wrap_to_width(text, width - 2 * LABEL_PAD, font)
    ascent, descent = font.getmetrics()
    line_height = ascent + descent
    strip = Image.new("RGB", (width, len(lines) * line_height + 2 * LABEL_PAD), "white")
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((LABEL_PAD, LABEL_PAD + i * line_height), line, fill="black", font=font)
    return np.asarray(strip)


def labelled_grid(prompts: Sequence[str], images: Sequence[torch.Tensor]) -> np.ndarray:
    """One (H, W, 3) uint8 image: each prompt's label above its row of samples (n, 3, h, w)
    in [-1, 1], which are enlarged by a whole factor when under MIN_TILE px high."""
    font = ImageFont.load_default(size=FONT_SIZE)
    rows = []
    for samples in images:
        scale = -(-MIN_TILE // samples.shape[-2])  # ceil: 1 for 128 px and larger
        row = Image.fromarray(to_uint8_grid(samples, nrow=len(samples)))
        rows.append(row.resize((row.width * scale, row.height * scale), Image.Resampling.NEAREST))
    width = max(row.width for row in rows)  # rows of other sizes are padded white on the right
    parts = []
    for prompt, row in zip(prompts, rows, strict=True):
        padded = Image.new("RGB", (width, row.height), "white")
        padded.paste(row)
        parts += [label_strip(prompt, width, font), np.asarray(padded)]
    return np.concatenate(parts)  # (H, W, 3)


def parse_prompts(prompts) -> list[tuple[str, tuple[int | None, int | None]]]:
    """[(prompt, (height, width))] from strings or `{prompt, height, width}` mappings (a size
    left out is the callback's); a ConfigError names a bad entry."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ConfigError(f"{WHERE}: prompts must be a non-empty list, got {prompts!r}")
    parsed = []
    for i, entry in enumerate(prompts):
        if isinstance(entry, str):
            parsed.append((entry, (None, None)))
        elif isinstance(entry, Mapping) and isinstance(entry.get("prompt"), str):
            if unknown := sorted(set(entry) - {"prompt", "height", "width"}):
                raise ConfigError(f"{WHERE}: prompts[{i}] has unknown keys {unknown}")
            parsed.append((entry["prompt"], (entry.get("height"), entry.get("width"))))
        else:
            raise ConfigError(
                f"{WHERE}: prompts[{i}] must be a string or {{prompt, height, width}}, "
                f"got {entry!r}"
            )
    return parsed


def check_params(every_n_steps: int, steps: int, n_per_prompt: int, sampler: str):
    """Raise a ConfigError naming the first bad param."""
    counts = {"every_n_steps": every_n_steps, "steps": steps, "n_per_prompt": n_per_prompt}
    for key, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{WHERE}: {key} must be an integer >= 1, got {value!r}")
    if sampler not in sampling.SAMPLERS:
        raise ConfigError(f"{WHERE}: sampler {sampler!r} is not one of {sorted(sampling.SAMPLERS)}")


class ValidationPrompts(pl.Callback):
    """Every `every_n_steps` optimizer steps, and after the last step, samples `prompts` from
    fixed start noise and saves one labelled grid per set of weights.

    Grids go to `<logdir>/images/validation/step-<step>-ema.png` (EMA models only) and
    `step-<step>-raw.png`, and to the TensorBoard or W&B logger as `validation/ema` and
    `validation/raw`. Prompt i's noise comes from a CPU generator seeded with `seed` + i, so
    every evaluation starts from the same noise. Under DDP rank 0 samples while the other ranks
    wait. The torch RNG, the weights and the train mode are left as they were, so training
    goes on exactly as without the callback.

    Args:
        prompts: the captions, one labelled row of `n_per_prompt` samples each; an entry
            `{prompt, height, width}` samples at its own size (e.g. one per bucket shape).
        guidance_scale: classifier-free guidance against the empty prompt; 1: unguided.
        height, width: in pixels, multiples of the first stage's factor; default: the
            model's own size.
    """

    def __init__(
        self,
        prompts: Sequence[str | Mapping],
        every_n_steps: int = 500,
        seed: int = 0,
        steps: int = 20,
        guidance_scale: float = 5.0,
        sampler: str = "ddim",
        n_per_prompt: int = 2,
        height: int | None = None,
        width: int | None = None,
    ):
        super().__init__()
        parsed = parse_prompts(to_plain(prompts))
        check_params(every_n_steps, steps, n_per_prompt, sampler)
        self.prompts, self.sizes = [text for text, _ in parsed], [size for _, size in parsed]
        self.every_n_steps, self.seed = every_n_steps, seed
        self.steps, self.guidance_scale, self.sampler = steps, guidance_scale, sampler
        self.n_per_prompt, self.size = n_per_prompt, (height, width)
        self.shapes: list[tuple[int, int, int]] = []  # (C, h, w) of each prompt's start noise
        self.last_step = 0  # the step of the last grids; none are made at step 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_rank_zero_sampling(trainer.strategy, WHERE)  # before training, as a bad config
        self.shapes = [self.latent_shape(pl_module, size) for size in self.sizes]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the first prompt's start noise."""
        return self.shapes[0]

    def latent_shape(self, model, size: tuple) -> tuple[int, int, int]:
        """(C, h, w) of the latents for a prompt's `size` (height, width) in pixels, where
        given, else the callback's, else the model's."""
        text = getattr(model, "cond_stage_model", None) is not None
        if not (text or getattr(model, "reads_text", False)):  # an SD model, or SDXL's
            raise ConfigError(f"{WHERE}: {type(model).__name__} is not a text-conditioned model")
        f = latent_factor(model)
        size = (own or default for own, default in zip(size, self.size, strict=True))
        height, width = (side or model.image_size * f for side in size)
        if height % f or width % f:
            raise ConfigError(
                f"{WHERE}: height {height} and width {width} must be multiples of {f}, "
                "the first stage's downsampling factor"
            )
        return model.channels, height // f, width // f

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps: the same after each accumulated batch
        if step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rank 0 writes the grids of this step; the other ranks wait for it."""
        self.last_step = trainer.global_step
        if trainer.is_global_zero:
            folder = Path(trainer.default_root_dir) / FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            for weights, images in self.sample_all(trainer, pl_module).items():
                grid = labelled_grid(self.prompts, images)
                Image.fromarray(grid).save(folder / f"step-{self.last_step:06}-{weights}.png")
                log_image(trainer.logger, f"validation/{weights}", grid, self.last_step)
            logger.info("step %d: validation grids in %s", self.last_step, folder)
        trainer.strategy.barrier()

    @torch.no_grad()
    def sample_all(self, trainer: pl.Trainer, pl_module) -> dict[str, list[torch.Tensor]]:
        """{"ema": ..., "raw": ...} (EMA models; else "raw" only): each prompt's samples."""
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                with trainer.precision_plugin.forward_context():
                    samples = {}
                    if getattr(pl_module, "use_ema", False):
                        with pl_module.ema_scope():
                            samples["ema"] = self.sample_prompts(pl_module)
                    samples["raw"] = self.sample_prompts(pl_module)
        finally:
            pl_module.train(was_training)
        return samples

    @torch.no_grad()
    def sample_prompts(self, model) -> list[torch.Tensor]:
        """Decoded samples (n_per_prompt, 3, H, W) in [-1, 1] per prompt, from its fixed noise."""
        n, images = self.n_per_prompt, []
        for i, prompt in enumerate(self.prompts):
            x_T = start_noise(
                self.seed + i, n, self.shapes[i], model.device, model.dtype
            )  # (n, C, h, w)
            # SDXL conditions on the image's size too: the prompt's own
            f, sizes = latent_factor(model), self.shapes[i][1:]
            micro = {"size": (sizes[0] * f, sizes[1] * f)} if hasattr(model, "conditioner") else {}
            cond = model.get_learned_conditioning([prompt] * n, **micro)
            uncond = None
            if self.guidance_scale != 1:
                uncond = model.get_learned_conditioning([""] * n, **micro)
            z = sampling.sample(
                model,
                cond,
                uncond,
                sampler=self.sampler,
                steps=self.steps,
                guidance_scale=self.guidance_scale,
                x_T=x_T,
            )
            images.append(model.decode_first_stage(z).float())
        return images
