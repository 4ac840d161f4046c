"""Upscale an image with a latent upscaler (SD 2's x4 model or a tiny one) and a text prompt.

    python scripts/upscale.py --init-img low.png --prompt "a red circle on a blue background" \\
        --ckpt logs/<upscaling run>
    python scripts/upscale.py --init-img low.png --prompt "a white cat" \\
        --ckpt x4-upscaler-ema.ckpt  # configs/stable-diffusion/x4-upscaling.yaml by default

The upscale is the latent factor f of the first stage (4) times the input's size: the input
is fed at the latent grid, its sides cut (centred) to multiples of the UNet's downsampling
(8 px for the x4 model). It is noised to `--noise_level` first (0 to the model's
max_noise_level, 350 for the x4 model; diffusers' default 20): more noise lets the model
redraw more of it, less keeps closer to it. Images go to OUTDIR/samples/00000.png ... and one
grid per run to OUTDIR/grid-0000.png, as txt2img.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.models.diffusion import sampling  # noqa: E402
from scripts.common import (  # noqa: E402
    add_common_args,
    conditionings,
    precision_scope,
    read_image,
    sampling_options,
    save,
    setup,
    to_tensor,
)

DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "x4-upscaling.yaml"
DEFAULT_NOISE_LEVEL = 20  # diffusers' StableDiffusionUpscalePipeline default
DEFAULT_SCALE = 9.0  # diffusers' and Stability-AI's upscaling demo default


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "outputs/upscale-samples", n_samples=1, n_iter=1)
    parser.set_defaults(
        scale=DEFAULT_SCALE, ckpt="models/ldm/stable-diffusion-x4-upscaler/x4-upscaler-ema.ckpt"
    )
    add = parser.add_argument
    add("--init-img", dest="init_img", required=True, help="the low-resolution image to upscale")
    add(
        "--noise_level",
        type=int,
        default=DEFAULT_NOISE_LEVEL,
        help="noise added to the low-res image, 0 to the model's max_noise_level",
    )
    add("--sampler", choices=sorted(sampling.SAMPLERS), default="ddim")
    return parser


def read_low_res(path: str, multiple: int) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1]: the image, its sides cut (centred) to multiples of `multiple`."""
    image = read_image(path, "--init-img")
    width, height = image.size
    if width < multiple or height < multiple:
        raise ValueError(
            f"--init-img {path} is {width}x{height} px: the model needs at least {multiple} px "
            "on each side (its UNet's downsampling)"
        )
    w, h = width - width % multiple, height - height % multiple
    left, top = (width - w) // 2, (height - h) // 2
    return to_tensor(image.crop((left, top, left + w, top + h)))


def check_upscaler_model(model, ckpt: str) -> None:
    if not hasattr(model, "upscale_conditions"):
        channels = model.model.diffusion_model.input_blocks[0][0].in_channels
        raise ValueError(
            f"--ckpt {ckpt}: a {type(model).__name__} (its UNet takes {channels} input "
            "channels), not an upscaler (LatentUpscaleDiffusion, 4 + 3 channels: pass its "
            "config with --config, e.g. configs/stable-diffusion/x4-upscaling.yaml)"
        )


def unet_multiple(model) -> int:
    """The latent side's multiple the UNet needs: 2 ** its downsamplings."""
    return 2 ** (len(model.model.diffusion_model.channel_mult) - 1)


def upscale(model, opt, low_res: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Upscales (n, 3, f h, f w) in [-1, 1] of `low_res` (1, 3, h, w), one per prompt."""
    n = len(prompts)
    context, uncond_context = conditionings(model, prompts, opt.scale)
    images = low_res.expand(n, -1, -1, -1)  # (n, 3, h, w)
    cond, uncond = model.upscale_conditions(images, context, opt.noise_level, uncond_context)
    latents = sampling.sample(
        model,
        cond,
        uncond,
        sampler=opt.sampler,
        **sampling_options(opt),
        batch_size=n,
        shape=(model.channels, *low_res.shape[-2:]),
        disable=False,
    )
    return model.decode_first_stage(latents).float().clamp(-1, 1)


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[torch.Tensor]:
    opt = get_parser().parse_args(argv)
    try:  # before loading the model: an option the sampler does not take stops at once
        sampling.sampler_options(opt.sampler, eta=opt.ddim_eta)
    except ValueError as err:
        sys.exit(f"upscale.py: --ddim_eta {opt.ddim_eta}: {err} (drop it, or use --sampler ddim)")
    model, device, batches = setup(opt, "upscale.py", DEFAULT_CONFIG)
    try:
        check_upscaler_model(model, opt.ckpt)
        model.check_noise_level(opt.noise_level, "--noise_level")
        low_res = read_low_res(opt.init_img, unet_multiple(model)).to(device)
    except ValueError as err:
        sys.exit(f"upscale.py: {err}")
    images = []
    with precision_scope(opt.precision, device):
        for _ in range(opt.n_iter):
            images += [upscale(model, opt, low_res, prompts) for prompts in batches]
    save(opt, images)
    return images


if __name__ == "__main__":
    main()
