"""Redraw an image after a text prompt: encode it, noise it part way, and denoise with DDIM.

    python scripts/img2img.py --init-img sketch.png --prompt "a red circle on a blue background" \\
        --strength 0.6 --ckpt logs/<run>

`--strength` in [0, 1] is how far into the noise the image goes: 0 gives back its
reconstruction through the autoencoder, 1 ignores it. The image is resized to a multiple of
8 × the latent factor (64 px for Stable Diffusion). Outputs are laid out as txt2img.py's, under
outputs/img2img-samples by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.inference import latent_factor  # noqa: E402
from ldm.models.diffusion import sampling  # noqa: E402
from scripts.common import (  # noqa: E402
    add_common_args,
    add_sdxl_args,
    conditionings,
    micro_conditioning,
    precision_scope,
    read_image,
    sampling_options,
    save,
    setup,
    to_tensor,
)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "outputs/img2img-samples", n_samples=2, n_iter=1)
    parser.set_defaults(scale=5.0)
    add = parser.add_argument
    add("--init-img", dest="init_img", required=True, help="path to the input image")
    add(
        "--strength",
        type=float,
        default=0.75,
        help="noise added to the input: 0 keeps it, 1 replaces it entirely",
    )
    add_sdxl_args(parser)
    return parser


def load_img(path: str, multiple: int) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]: the image at `path`, shrunk to multiples of `multiple`."""
    image = read_image(path, "--init-img")
    width, height = (max(multiple, v - v % multiple) for v in image.size)
    return to_tensor(image.resize((width, height), Image.Resampling.LANCZOS))


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[torch.Tensor]:
    opt = get_parser().parse_args(argv)
    if not 0.0 <= opt.strength <= 1.0:
        sys.exit(f"img2img.py: --strength {opt.strength} must lie in [0, 1]")
    if not Path(opt.init_img).is_file():
        sys.exit(f"img2img.py: --init-img {opt.init_img}: no such file")
    model, device, batches = setup(opt, "img2img.py")
    try:
        init = load_img(opt.init_img, 8 * latent_factor(model)).to(device)
        micro = micro_conditioning(opt, model, tuple(init.shape[-2:]))
    except ValueError as err:
        sys.exit(f"img2img.py: {err}")
    images = []
    with precision_scope(opt.precision, device):
        z0 = model.scale_factor * model.encode_first_stage(init).mode()  # (1, C, h, w)
        for _ in range(opt.n_iter):
            for prompts in batches:
                cond, uncond = conditionings(model, prompts, opt.scale, micro)
                latents = sampling.img2img(
                    model,
                    z0.expand(len(prompts), -1, -1, -1),
                    cond,
                    uncond,
                    strength=opt.strength,
                    **sampling_options(opt),
                )
                images.append(model.decode_first_stage(latents).float().clamp(-1, 1))
    save(opt, images)
    return images


if __name__ == "__main__":
    main()
