"""Train the tiny 4x latent upscaler on the embedded shapes and measure it at full size: 8 px
images of the demo's prompts upscaled to 32 px, judged by the demo's judge.

    python scripts/demo.py                                   # the autoencoder, once
    python scripts/demo_upscale.py --autoencoder_run logs/<time>_demo-autoencoder

1. The upscaler (configs/tiny/upscaling.yaml: SD 2's x4 design, `hybrid-adm`, the low-res
   image noise-augmented and its noise level the UNet's class label) trains on the demo's
   autoencoder's latents, with 8 px area-downsampled shapes as its input.
2. The test: for every (colour, shape) of the demo's prompt grid, images drawn at 32 px,
   shrunk to 8 px, upscaled with the prompt at noise level 20. The 32 px results are judged
   (colour, shape, background), and compared with the originals (PSNR).
3. Baselines on the same inputs: bicubic upscaling, and the originals themselves (the judge's
   ceiling).

Pictures and scores go to --outdir: `upscale.png` (rows of 8 px input, bicubic, upscaler,
original) and `upscale.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as train  # noqa: E402
from ldm.callbacks import to_uint8_grid  # noqa: E402
from ldm.checkpoint import last_checkpoint  # noqa: E402
from ldm.data.lowres import area_downsample  # noqa: E402
from ldm.data.shapes_judge import accuracy, judge, prompt_grid, to_uint8  # noqa: E402
from ldm.data.synthetic import SyntheticShapes  # noqa: E402
from scripts.common import add_demo_args, demo_sampling_flags, run_demo  # noqa: E402
from scripts.upscale import upscale  # noqa: E402

FACTOR = 4
NOISE_LEVEL = 20


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--autoencoder_run", required=True, help="the demo's autoencoder log dir (demo.py)")
    add_demo_args(parser, "outputs/demo-upscale", steps=1500)
    return parser


def test_images(data: SyntheticShapes, n_per_prompt: int, seed: int):
    """(originals (N, 3, 32, 32), 8 px inputs (N, 3, 8, 8), labels)."""
    rng = np.random.default_rng(seed)
    labels = [label for label in prompt_grid(data, seed) for _ in range(n_per_prompt)]
    originals = np.stack([data.render(*label, rng) for label in labels])  # (N, 32, 32, 3)
    low = np.stack([area_downsample(image, FACTOR) for image in originals])  # (N, 8, 8, 3)
    return channels_first(originals), channels_first(low), labels


def channels_first(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def scores(images: torch.Tensor, data, labels, originals: torch.Tensor | None = None) -> dict:
    """The judge's accuracy on `images` and their PSNR (dB) against the originals, if given."""
    result = accuracy([judge(image, data) for image in to_uint8(images)], labels)
    if originals is not None:
        mse = ((images.clamp(-1, 1) - originals) / 2).pow(2).mean(dim=(1, 2, 3))  # in [0, 1]²
        result["psnr_db"] = round(float((-10 * mse.log10()).mean()), 2)
    return result


@torch.no_grad()
def evaluate(model, data: SyntheticShapes, opt) -> dict:
    originals, low, labels = test_images(data, opt.n_per_prompt, opt.seed)
    options = demo_sampling_flags(opt, noise_level=NOISE_LEVEL)
    torch.manual_seed(opt.seed)
    upscaled = []
    for start in range(0, len(labels), 32):
        prompts = [data.caption(*label) for label in labels[start : start + 32]]
        upscaled.append(upscale(model, options, low[start : start + 32], prompts).cpu())
    upscaled = torch.cat(upscaled)
    bicubic = F.interpolate(low, scale_factor=FACTOR, mode="bicubic", align_corners=False)
    nearest = F.interpolate(low, scale_factor=FACTOR, mode="nearest")
    rows = torch.stack([nearest, bicubic, upscaled, originals], 1)[:: opt.n_per_prompt]
    grid = to_uint8_grid(rows[:12].flatten(0, 1), nrow=4)
    Image.fromarray(grid).save(Path(opt.outdir) / "upscale.png")
    return {
        "upscaler": scores(upscaled, data, labels, originals),
        "bicubic": scores(bicubic, data, labels, originals),
        "originals": scores(originals, data, labels),
        "n_images": len(labels),
        "noise_level": NOISE_LEVEL,
    }


def fit(opt) -> Path:
    """The upscaler trained through main.py on the demo's autoencoder; its log dir."""
    ae = last_checkpoint(Path(opt.autoencoder_run))
    trainer = train.main(
        ["--base", str(ROOT / "configs/tiny/upscaling.yaml"), "-t", "--no-test"]
        + ["-n", "demo-upscale", "-l", opt.logdir, "-s", str(opt.seed)]
        + ["--max_steps", str(opt.steps)]
        + [f"model.params.first_stage_config.params.ckpt_path={ae}"]
    )
    return Path(trainer.default_root_dir)


def main(argv: list[str] | None = None) -> dict:
    return run_demo(
        get_parser().parse_args(argv),
        fit,
        evaluate,
        "data.params.validation.params.dataset",
        "upscale.json",
    )


if __name__ == "__main__":
    main()
