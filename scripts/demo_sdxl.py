"""Train the tiny SDXL-shaped model on the embedded shapes at two aspect ratios and measure its
prompt adherence at each with the demo's judge.

    python scripts/demo.py                                   # the autoencoder, once
    python scripts/demo_sdxl.py --autoencoder_run logs/<time>_demo-autoencoder

1. configs/tiny/sdxl.yaml (generative-models' DiffusionEngine: two text encoders, the size and
   crop embeddings, a UNet with per-level depth) trains on the demo's autoencoder's latents,
   cached with every embedder's outputs (configs/tiny/cached.yaml). Half the shapes are drawn
   square (32 x 32 px), half wide (48 x 32 px): batches hold one of the two, as aspect-ratio
   buckets do, and the model is told each image's size.
2. The test: every (colour, shape) of the demo's prompt grid, sampled at each of the two
   sizes (the size conditioning set to it, as SDXL's scripts do), judged by the demo's judge.

Pictures and scores go to --outdir: `samples_<W>x<H>.png` (the first image of each prompt)
and `sdxl.json`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as train  # noqa: E402
from ldm import inference  # noqa: E402
from ldm.callbacks import to_uint8_grid  # noqa: E402
from ldm.checkpoint import last_checkpoint  # noqa: E402
from ldm.data.shapes_judge import accuracy, judge, prompt_grid, to_uint8  # noqa: E402
from ldm.models.diffusion import sampling  # noqa: E402
from scripts.common import add_demo_args, run_demo  # noqa: E402

SIZES = ((32, 32), (48, 32))  # (width, height): square and 3:2
CACHE_DIR = "demo-sdxl-latent-cache"  # under --logdir


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--autoencoder_run", required=True, help="the demo's autoencoder log dir (demo.py)")
    add_demo_args(parser, "outputs/demo-sdxl", steps=3500)
    add("--length", type=int, default=4096, help="shapes in the training set (and its cache)")
    return parser


def fit(opt) -> Path:
    """The tiny SDXL model trained through main.py on the demo's autoencoder; its log dir."""
    ae = last_checkpoint(Path(opt.autoencoder_run))
    sizes = "[" + ",".join(f"[{w},{h}]" for w, h in SIZES) + "]"
    configs = [str(ROOT / "configs" / "tiny" / name) for name in ("sdxl.yaml", "cached.yaml")]
    trainer = train.main(
        ["--base", *configs, "-t", "--no-test", "-n", "demo-sdxl", "-l", opt.logdir]
        + ["-s", str(opt.seed), "--max_steps", str(opt.steps)]
        + [f"model.params.first_stage_config.params.ckpt_path={ae}"]
        + [f"data.params.{split}.params.sizes={sizes}" for split in ("train", "validation")]
        + [f"data.params.train.params.length={opt.length}"]
        + [f"lightning.callbacks.latent_cache.params.dir={Path(opt.logdir) / CACHE_DIR}"]
    )
    return Path(trainer.default_root_dir)


@torch.no_grad()
def generate(model, captions: list[str], size: tuple[int, int], opt) -> torch.Tensor:
    """Images (B, 3, H, W) for `captions` at `size` (width, height), EMA weights, guided."""
    width, height = size
    f = inference.latent_factor(model)
    generator = torch.Generator(model.device).manual_seed(opt.seed)
    with model.ema_scope():
        cond = model.get_learned_conditioning(captions, size=(height, width))
        uncond = model.get_learned_conditioning([""] * len(captions), size=(height, width))
        latents = sampling.sample(
            model,
            cond,
            uncond,
            steps=opt.eval_steps,
            guidance_scale=opt.scale,
            eta=1.0,  # as evaluate.py scores
            batch_size=len(captions),
            shape=(model.channels, height // f, width // f),
            generator=generator,
        )
        return model.decode_first_stage(latents)


def evaluate(model, data, opt) -> dict:
    """Scores at each size over the prompt grid; a sample grid per size in --outdir."""
    labels = [label for label in prompt_grid(data, opt.seed) for _ in range(opt.n_per_prompt)]
    captions = [data.caption(*label) for label in labels]
    result = {}
    for size in SIZES:
        images = torch.cat(
            [generate(model, captions[i : i + 32], size, opt) for i in range(0, len(labels), 32)]
        )
        verdicts = [judge(image, data) for image in to_uint8(images)]
        result[f"{size[0]}x{size[1]}"] = accuracy(verdicts, labels)
        grid = to_uint8_grid(images[:: opt.n_per_prompt].cpu(), nrow=6)
        Image.fromarray(grid).save(Path(opt.outdir) / f"samples_{size[0]}x{size[1]}.png")
    return {**result, "n_images_per_size": len(labels)}


def main(argv: list[str] | None = None) -> dict:
    return run_demo(
        get_parser().parse_args(argv), fit, evaluate, "data.params.validation", "sdxl.json"
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
