"""Inpaint images where their masks are white, with an inpainting model and a text prompt.

    python scripts/inpaint.py --indir inputs/ --outdir outputs/inpainting \\
        --prompt "a red circle on a blue background" --ckpt logs/<inpainting run>
    python scripts/inpaint.py --indir inputs/ --ckpt sd-v1-5-inpainting.ckpt \\
        --config configs/stable-diffusion/v1-inpainting-inference.yaml --prompt "a cat"

`--indir` holds `name.png` images, each with `name_mask.png` beside it (as the original
scripts/inpaint.py reads them): white where the image is to be painted, black where it is
kept; both of one size, resized to a multiple of 8 × the latent factor (64 px for SD). Each
result is written as `OUTDIR/name.png` (then `name-1.png`, ... for more `--n_samples` or
`--from-file` prompts). What
the mask keeps comes back through the autoencoder, so as its reconstruction; `--paste` puts
the original pixels back there exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.inference import latent_factor  # noqa: E402
from ldm.models.diffusion import sampling  # noqa: E402
from scripts.common import (  # noqa: E402
    add_common_args,
    conditionings,
    precision_scope,
    read_image,
    sampling_options,
    setup,
    to_pil,
    to_tensor,
)

DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml"
MASK_SUFFIX = "_mask.png"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "outputs/inpainting-samples", n_samples=1, n_iter=1)
    add = parser.add_argument
    add("--indir", required=True, help="a folder of name.png + name_mask.png pairs")
    add("--steps", type=int, dest="ddim_steps", default=argparse.SUPPRESS, help="--ddim_steps")
    add("--sampler", choices=sorted(sampling.SAMPLERS), default="ddim")
    add("--paste", action="store_true", help="put the original pixels back where masks are black")
    return parser


def find_pairs(indir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of `indir`; an image without its mask is an error naming it."""
    images = sorted(p for p in indir.glob("*.png") if not p.name.endswith(MASK_SUFFIX))
    if not images:
        raise ValueError(f"--indir {indir}: no name.png images (with name{MASK_SUFFIX} masks)")
    missing = [p.name for p in images if not p.with_name(p.stem + MASK_SUFFIX).is_file()]
    if missing:
        raise ValueError(f"--indir {indir}: no {MASK_SUFFIX} mask for {', '.join(missing)}")
    return [(p, p.with_name(p.stem + MASK_SUFFIX)) for p in images]


def read_pair(image_path: Path, mask_path: Path, multiple: int) -> tuple[torch.Tensor, ...]:
    """(image (1, 3, H, W) in [-1, 1], mask (1, 1, H, W) in {0, 1}), sides cut down to
    multiples of `multiple`."""
    image, mask = read_image(image_path, "image"), read_image(mask_path, "mask", "L")
    if image.size != mask.size:
        raise ValueError(
            f"{mask_path.name} is {mask.size[0]}x{mask.size[1]} but {image_path.name} is "
            f"{image.size[0]}x{image.size[1]}: a mask must have its image's size"
        )
    size = tuple(max(multiple, v - v % multiple) for v in image.size)
    image = image.resize(size, Image.Resampling.LANCZOS)
    mask = mask.resize(size, Image.Resampling.NEAREST)
    binary = torch.from_numpy((np.asarray(mask, dtype=np.float32) >= 127.5).astype(np.float32))
    return to_tensor(image), binary[None, None]


def check_inpainting_model(model, ckpt: str) -> None:
    if not hasattr(model, "masked_image_key"):
        channels = model.model.diffusion_model.input_blocks[0][0].in_channels
        raise ValueError(
            f"--ckpt {ckpt}: a {type(model).__name__} (its UNet takes {channels} input "
            "channels), not an inpainting model (LatentInpaintDiffusion, 9 channels: pass its "
            "config with --config, e.g. configs/stable-diffusion/v1-inpainting-inference.yaml)"
        )


def inpaint(model, opt, image: torch.Tensor, mask: torch.Tensor, prompts: list[str]):
    """Samples (n, 3, H, W) in [-1, 1] of `image` painted where `mask` is 1."""
    n = len(prompts)
    batch = {
        "mask": mask.permute(0, 2, 3, 1).expand(n, -1, -1, -1),  # (n, H, W, 1)
        "masked_image": (image * (1 - mask)).permute(0, 2, 3, 1).expand(n, -1, -1, -1),
    }
    f = latent_factor(model)
    size = (image.shape[-2] // f, image.shape[-1] // f)
    c_concat = model.concat_input(batch, size)  # (n, 5, h, w)
    text, uncond_text = conditionings(model, prompts, opt.scale)
    cond = {"c_concat": [c_concat], "c_crossattn": [text]}
    uncond = None if uncond_text is None else {"c_concat": [c_concat], "c_crossattn": [uncond_text]}
    latents = sampling.sample(
        model,
        cond,
        uncond,
        sampler=opt.sampler,
        **sampling_options(opt),
        batch_size=n,
        shape=(model.channels, *size),
        disable=False,
    )
    result = model.decode_first_stage(latents).float().clamp(-1, 1)
    return mask * result + (1 - mask) * image if opt.paste else result


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[torch.Tensor]:
    opt = get_parser().parse_args(argv)
    try:
        pairs = find_pairs(Path(opt.indir))
    except ValueError as err:
        sys.exit(f"inpaint.py: {err}")
    model, device, batches = setup(opt, "inpaint.py", DEFAULT_CONFIG)
    try:
        check_inpainting_model(model, opt.ckpt)
        inputs = [read_pair(*pair, 8 * latent_factor(model)) for pair in pairs]
    except ValueError as err:
        sys.exit(f"inpaint.py: {err}")
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    results = []
    with precision_scope(opt.precision, device):
        for (image_path, _), (image, mask) in zip(pairs, inputs, strict=True):
            samples = torch.cat(
                [inpaint(model, opt, image.to(device), mask.to(device), p) for p in batches]
            )
            for i, picture in enumerate(to_pil(samples)):
                picture.save(outdir / (image_path.name if i == 0 else f"{image_path.stem}-{i}.png"))
            results.append(samples)
    print(f"inpainted: {outdir}")
    return results


if __name__ == "__main__":
    main()
