"""Turn the embedded demo's text-to-image model into an inpainting model and measure it: paint
another shape or colour into a masked box and keep everything outside the box.

    python scripts/demo.py                                   # the base model, once
    python scripts/demo_inpainting.py --base_run logs/<time>_demo-txt2img

1. The base run's EMA weights become one file (as released models are), and an inpainting
   model (configs/tiny/inpainting.yaml: SD's 9-channel UNet, `hybrid` conditioning) is
   fine-tuned from it: `finetune_keys` widens the UNet's first convolution, the 5 new input
   channels (the mask and the masked image's latent) start at zero, and it trains on the
   synthetic shapes with the SD inpainting recipe's random strokes, boxes and full masks.
2. The test: for every (colour, shape) of the demo's prompt grid, an image of another colour
   and shape on the prompt's background, a box mask over the shape, and the prompt. The
   inpainted image is judged by the demo's judge (colour, shape, background: inside the box
   the new shape must appear) and compared outside the box with the input (mean absolute
   difference in 0..255, and the share of those pixels within 16 levels).
3. The same test for the model before fine-tuning (the widened text-to-image model, which
   ignores the mask) as the baseline, and the autoencoder's reconstruction of the inputs: the
   most that can stay outside the box without pasting the original back (`inpaint.py
   --paste` keeps it exactly).

Pictures and scores go to --outdir: `inpainting.png` (rows of input, mask, result) and
`inpainting.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as train  # noqa: E402
from ldm import inference  # noqa: E402
from ldm.callbacks import to_uint8_grid  # noqa: E402
from ldm.data.shapes_judge import accuracy, judge, prompt_grid, to_uint8  # noqa: E402
from ldm.data.synthetic import SyntheticShapes, draw_shape  # noqa: E402
from ldm.data.transform import to_unit_range  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from scripts import convert  # noqa: E402
from scripts.common import add_demo_args, demo_sampling_flags  # noqa: E402
from scripts.inpaint import inpaint  # noqa: E402

BOX = (5, 27)  # the mask: rows and columns 5..26 of the 32 px image
CENTER, RADIUS = (16.0, 16.0), 10.0  # the input's shape fills the box
CLOSE = 16  # levels: an outside pixel "kept" when within this of the input


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--base_run", required=True, help="the demo's text-to-image log dir (scripts/demo.py)")
    add_demo_args(parser, "outputs/demo-inpainting", steps=1500)
    return parser


def test_cases(data: SyntheticShapes, n_per_prompt: int, seed: int):
    """(inputs (N, 3, 32, 32), mask (1, 1, 32, 32), labels asked for): each prompt's image
    shows another colour and shape on the prompt's background."""
    n_colors, n_shapes = len(data.color_names), len(data.shape_names)
    inputs, labels = [], []
    for color, shape, background in prompt_grid(data, seed):
        other = next(c for c in range(color + 1, color + n_colors) if c % n_colors != background)
        pixels = draw_shape(
            data.shape_names[(shape + 1) % n_shapes],
            data.size,
            CENTER,
            RADIUS,
            data.color_values[other % n_colors],
            data.color_values[background],
        )
        image = torch.from_numpy(to_unit_range(pixels)).permute(2, 0, 1)  # (3, H, W)
        inputs += [image] * n_per_prompt
        labels += [(color, shape, background)] * n_per_prompt
    mask = torch.zeros(1, 1, data.size, data.size)
    mask[..., BOX[0] : BOX[1], BOX[0] : BOX[1]] = 1
    return torch.stack(inputs), mask, labels


@torch.no_grad()
def score(model, data: SyntheticShapes, opt, name: str) -> dict:
    """The judge's accuracy on the inpaintings and how much stays outside the box."""
    inputs, mask, labels = test_cases(data, opt.n_per_prompt, opt.seed)
    options = demo_sampling_flags(opt, paste=False)
    torch.manual_seed(opt.seed)
    results = []
    for start in range(0, len(inputs), 32):
        images, captions = inputs[start : start + 32], labels[start : start + 32]
        prompts = [data.caption(*label) for label in captions]
        with model.ema_scope():
            results.append(inpaint(model, options, images, mask, prompts).cpu())
    results = torch.cat(results)
    verdicts = [judge(image, data) for image in to_uint8(results)]
    rows = torch.stack([inputs, mask.expand_as(inputs) * 2 - 1, results], 1)[:: opt.n_per_prompt]
    grid = to_uint8_grid(rows[:12].flatten(0, 1), nrow=3)
    Image.fromarray(grid).save(Path(opt.outdir) / f"{name}.png")
    return {
        **accuracy(verdicts, labels),
        **outside_scores(results, inputs, mask),
        "n_images": len(labels),
    }


@torch.no_grad()
def outside_scores(painted: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor) -> dict:
    """How close `painted` (N, 3, H, W) stays to `inputs` outside the box: the mean absolute
    difference in 0..255, and the share of pixels within CLOSE levels."""
    outside = (mask[0, 0] == 0).numpy()
    difference = np.abs(to_uint8(painted).astype(int) - to_uint8(inputs).astype(int))[:, outside]
    return {
        "outside_mean_abs_diff": round(float(difference.mean()), 2),
        "outside_kept": round(float((difference.max(-1) <= CLOSE).mean()), 3),
    }


@torch.no_grad()
def autoencoder_ceiling(model, data: SyntheticShapes, opt) -> dict:
    """outside_scores of the autoencoder's reconstructions (posterior mode) of the inputs."""
    inputs, mask, _ = test_cases(data, 1, opt.seed)
    reconstructions = model.first_stage_model.decode(model.first_stage_model.encode(inputs).mode())
    return outside_scores(reconstructions.clamp(-1, 1), inputs, mask)


def fine_tune(opt, base_file: Path) -> Path:
    """The inpainting model fine-tuned from `base_file` through main.py; its log dir."""
    config = OmegaConf.load(ROOT / "configs/tiny/inpainting.yaml")
    config.model.params.ckpt_path = str(base_file)
    path = Path(opt.outdir) / "inpainting.yaml"
    OmegaConf.save(config, path)
    trainer = train.main(
        ["--base", str(path), "-t", "--no-test", "-n", "demo-inpainting", "-l", opt.logdir]
        + ["-s", str(opt.seed), "--max_steps", str(opt.steps)]
    )
    return Path(trainer.default_root_dir)


def main(argv: list[str] | None = None) -> dict:
    opt = get_parser().parse_args(argv)
    out = Path(opt.outdir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    base_file = out / "base.safetensors"
    convert.main(["--ckpt", opt.base_run, "--use_ema", "--out", str(base_file)])
    config = OmegaConf.load(ROOT / "configs/tiny/inpainting.yaml")
    data = instantiate_from_config(config.data.params.validation.params.dataset)
    config.model.params.ckpt_path = str(base_file)
    before = instantiate_from_config(config.model).eval()
    result = {
        "autoencoder_ceiling": autoencoder_ceiling(before, data, opt),
        "before_fine_tuning": score(before, data, opt, "before"),
    }
    began = time.time()
    run = fine_tune(opt, base_file)
    model, _ = inference.load_model(run)
    result["fine_tuned"] = {
        **score(model, data, opt, "inpainting"),
        "train_minutes": round((time.time() - began) / 60, 1),
        "steps": opt.steps,
    }
    result["total_minutes"] = round((time.time() - start) / 60, 1)
    (out / "inpainting.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
