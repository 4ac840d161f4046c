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
from pytorch_lightning import seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm import inference  # noqa: E402
from ldm.checkpoint import run_files  # noqa: E402
from ldm.inference import latent_factor  # noqa: E402
from ldm.models.diffusion import sampling  # noqa: E402
from scripts.common import (  # noqa: E402
    add_common_args,
    add_sdxl_args,
    conditionings,
    micro_conditioning,
    precision_scope,
    prepare_for_precision,
    sampling_options,
    save,
    setup,
)

# How far the refiner noises the base's latents: generative-models' sampling demo's default.
REFINER_STRENGTH = 0.3


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
    add("--refiner", help="an SDXL refiner checkpoint or run dir, run on the base's latents")
    add("--refiner_config", nargs="+", help="the refiner's config (default: its run dir's)")
    add(
        "--refiner_strength",
        type=float,
        default=REFINER_STRENGTH,
        help="how far the refiner noises the base's latents before denoising them (0..1)",
    )
    return parser


def load_refiner(opt, base, device: torch.device):
    """The --refiner model, ready for the base's latents; bad options exit naming them."""
    if opt.refiner_config is None and not run_files(opt.refiner)[0]:
        sys.exit(f"txt2img.py: --refiner {opt.refiner} is a file: give its --refiner_config")
    if not 0.0 <= opt.refiner_strength <= 1.0:
        sys.exit(f"txt2img.py: --refiner_strength {opt.refiner_strength} must lie in [0, 1]")
    try:
        refiner, _ = inference.load_model(
            opt.refiner, opt.refiner_config, use_ema=opt.use_ema, device=device,
            unsafe_pickle=opt.unsafe_pickle,
        )  # fmt: skip
        prepare_for_precision(refiner, opt.precision, device)
    except (ValueError, OSError, RuntimeError) as err:
        sys.exit(f"txt2img.py: --refiner {opt.refiner}: {err}")
    if not hasattr(refiner, "conditioner") or refiner.channels != base.channels:
        sys.exit(
            f"txt2img.py: --refiner {opt.refiner} is a {type(refiner).__name__} with "
            f"{refiner.channels}-channel latents; a refiner is an SDXL model (DiffusionEngine) "
            f"on the base's {base.channels}-channel latents"
        )
    return refiner


def refine(refiner, base, latents: torch.Tensor, prompts, opt, micro) -> torch.Tensor:
    """The base's latents redrawn by the refiner, --refiner_strength of the way (img2img).
    The refiner works in the base's latent space (SDXL's two share one autoencoder), scaled
    by its own scale_factor; the result comes back in the base's scale, for its decoder."""
    z = latents / base.scale_factor * refiner.scale_factor
    cond, uncond = conditionings(refiner, prompts, opt.scale, micro)
    z = sampling.img2img(
        refiner, z, cond, uncond, strength=opt.refiner_strength, **sampling_options(opt)
    )
    return z / refiner.scale_factor * base.scale_factor


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
    refiner = None
    if opt.refiner is not None:
        refiner = load_refiner(opt, model, device)
        seed_everything(opt.seed, verbose=False)  # the base's noise as without a refiner
    size = (shape[1] * f, shape[2] * f)
    try:
        micro = micro_conditioning(opt, model, size)
        refiner_micro = None if refiner is None else micro_conditioning(opt, refiner, size)
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
                if refiner is not None:
                    latents = refine(refiner, model, latents, prompts, opt, refiner_micro)
                images.append(model.decode_first_stage(latents).float().clamp(-1, 1))
    save(opt, images)
    return images


if __name__ == "__main__":
    main()
