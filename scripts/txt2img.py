"""Sample images for text prompts with DDIM, PLMS or DPM-Solver++ and classifier-free guidance.

    python scripts/txt2img.py --prompt "a red circle on a blue background" --ckpt logs/<run>
    python scripts/txt2img.py --prompt "a photo of an astronaut riding a horse on mars" \\
        --ckpt v1-5-pruned-emaonly.safetensors --config configs/stable-diffusion/v1-inference.yaml

Images go to OUTDIR/samples/00000.png ... (numbered after those already there) and one grid per
run to OUTDIR/grid-0000.png. `--ckpt` takes a checkpoint or a `main.py` log dir (its saved
config and checkpoints/last.ckpt). The original's invisible watermark and NSFW safety checker
are left out: both need models downloaded from the network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.inference import latent_factor  # noqa: E402
from ldm.models.diffusion import sampling  # noqa: E402
from scripts.common import (  # noqa: E402
    add_common_args,
    add_sdxl_args,
    conditionings,
    micro_conditioning,
    precision_scope,
    sampling_options,
    save,
    setup,
)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "outputs/txt2img-samples", n_samples=3, n_iter=2)
    add = parser.add_argument
    add("--sampler", choices=sorted(sampling.SAMPLERS), default="ddim")
    add("--plms", action="store_const", dest="sampler", const="plms", help="--sampler plms")
    add("--dpm", action="store_const", dest="sampler", const="dpm", help="--sampler dpm")
    add("--fixed_code", action="store_true", help="one start code for every batch")
    add("--H", type=int, help="image height in pixels (default: the model's)")
    add("--W", type=int, help="image width in pixels (default: the model's)")
    add("--C", type=int, help="latent channels (default: the model's)")
    add("--f", type=int, help="downsampling factor (default: the first stage's)")
    add_sdxl_args(parser)
    return parser


def latent_shape(opt, model) -> tuple[int, int, int]:
    """(C, H / f, W / f), each from the options or else the model."""
    f = opt.f or latent_factor(model)
    height, width = opt.H or model.image_size * f, opt.W or model.image_size * f
    if height % f or width % f:
        sys.exit(f"txt2img.py: --H {height} and --W {width} must be multiples of --f {f}")
    return opt.C or model.channels, height // f, width // f


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[torch.Tensor]:
    opt = get_parser().parse_args(argv)
    try:  # before loading the model: an option the sampler does not take stops at once
        sampling.sampler_options(opt.sampler, eta=opt.ddim_eta)
    except ValueError as err:
        sys.exit(f"txt2img.py: --ddim_eta {opt.ddim_eta}: {err} (drop it, or use --sampler ddim)")
    model, device, batches = setup(opt, "txt2img.py")
    shape = latent_shape(opt, model)
    f = opt.f or latent_factor(model)
    try:
        micro = micro_conditioning(opt, model, (shape[1] * f, shape[2] * f))
    except ValueError as err:
        sys.exit(f"txt2img.py: {err}")
    start_code = None
    if opt.fixed_code:
        start_code = torch.randn((opt.n_samples, *shape), device=device)
    images = []
    with precision_scope(opt.precision, device):
        for _ in range(opt.n_iter):
            for prompts in batches:
                cond, uncond = conditionings(model, prompts, opt.scale, micro)
                x_T = None if start_code is None else start_code[: len(prompts)]
                latents = sampling.sample(
                    model,
                    cond,
                    uncond,
                    sampler=opt.sampler,
                    **sampling_options(opt),
                    x_T=x_T,
                    batch_size=len(prompts),
                    shape=shape,
                    disable=False,
                )
                images.append(model.decode_first_stage(latents).float().clamp(-1, 1))
    save(opt, images)
    return images


if __name__ == "__main__":
    main()
