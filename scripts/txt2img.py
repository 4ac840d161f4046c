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
from ldm.checkpoint import UNSAFE_PICKLE_FLAG  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.dpm_solver import DPMSolverSampler  # noqa: E402
from ldm.models.diffusion.plms import PLMSSampler  # noqa: E402
from ldm.modules.acceleration import compile_forward  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler}


def add_common_args(parser: argparse.ArgumentParser, outdir: str, n_samples: int, n_iter: int):
    """The flags txt2img.py and img2img.py share, with the original defaults."""
    add = parser.add_argument
    add("--prompt", default="a painting of a virus monster playing guitar", help="what to draw")
    add("--outdir", default=outdir, help="dir to write results to")
    add("--skip_grid", action="store_true", help="do not save a grid, only single images")
    add("--skip_save", action="store_true", help="do not save single images, only the grid")
    add("--ddim_steps", type=int, default=50, help="number of sampling steps")
    add("--ddim_eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    add("--n_iter", type=int, default=n_iter, help="sample this often")
    add("--n_samples", type=int, default=n_samples, help="batch size: images per prompt batch")
    add("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    add("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    add("--guidance_rescale", type=float, default=0.0,
        help="guidance rescale phi of Lin et al. (0.7 for zero-SNR models; 0: off)")  # fmt: skip
    add("--from-file", dest="from_file", help="a text file of prompts, one per line, batched")
    add("--config", nargs="+", help="model config (default: the log dir's, else v1-inference.yaml)")
    add("--ckpt", default="models/ldm/stable-diffusion-v1/model.ckpt",
        help="checkpoint (.ckpt / .safetensors) or a main.py log dir")  # fmt: skip
    add("--seed", type=int, default=42, help="seed for reproducible sampling")
    add("--precision", choices=["full", "autocast"], default="autocast",
        help="autocast: fp16 on GPUs, bf16 on the CPU; full: fp32")  # fmt: skip
    add("--device", choices=inference.DEVICES, help="default: cuda, else mps, else cpu")
    add("--use_ema", action=argparse.BooleanOptionalAction, default=True,
        help="sample with the EMA weights when the checkpoint has them")  # fmt: skip
    add("--compile", action="store_true",
        help="torch.compile the UNet (worth it for many batches; falls back to eager)")  # fmt: skip
    add(UNSAFE_PICKLE_FLAG, action="store_true",
        help="unpickle objects in a .ckpt (runs their code: only for files you trust)")  # fmt: skip


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "outputs/txt2img-samples", n_samples=3, n_iter=2)
    add = parser.add_argument
    add("--sampler", choices=sorted(SAMPLERS), default="ddim")
    add("--plms", action="store_const", dest="sampler", const="plms", help="--sampler plms")
    add("--dpm", action="store_const", dest="sampler", const="dpm", help="--sampler dpm")
    add("--fixed_code", action="store_true", help="one start code for every batch")
    add("--H", type=int, help="image height in pixels (default: the model's)")
    add("--W", type=int, help="image width in pixels (default: the model's)")
    add("--C", type=int, help="latent channels (default: the model's)")
    add("--f", type=int, help="downsampling factor (default: the first stage's)")
    return parser


def setup(opt, script: str):
    """(model, device, prompt batches) for the options; bad options exit naming them."""
    try:
        batches = inference.read_prompts(opt.prompt, opt.from_file, opt.n_samples)
        config = opt.config
        if config is None and not inference.run_files(opt.ckpt)[0]:
            config = [DEFAULT_CONFIG]  # not a main.py run: an original SD v1 file, as the original
        device = inference.choose_device(opt.device)
        model, _ = inference.load_model(
            opt.ckpt, config, use_ema=opt.use_ema, device=device, unsafe_pickle=opt.unsafe_pickle
        )
        inference.prepare_for_precision(model, opt.precision, device)
        if opt.compile:
            compile_forward(model.model.diffusion_model, "the UNet")
    except (ValueError, OSError, RuntimeError) as err:
        sys.exit(f"{script}: {err}")
    seed_everything(opt.seed, verbose=False)
    return model, device, batches


def conditionings(model, prompts: list[str], scale: float):
    """(cond, uncond or None) for a batch of prompts; the empty prompt is the unconditional."""
    uncond = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
    return model.get_learned_conditioning(prompts), uncond


def latent_shape(opt, model) -> tuple[int, int, int]:
    """(C, H / f, W / f), each from the options or else the model."""
    f = opt.f or inference.latent_factor(model)
    height, width = opt.H or model.image_size * f, opt.W or model.image_size * f
    if height % f or width % f:
        sys.exit(f"txt2img.py: --H {height} and --W {width} must be multiples of --f {f}")
    return opt.C or model.channels, height // f, width // f


def save(opt, images: list[torch.Tensor]) -> None:
    """Single images and the grid of all of them, as the options say."""
    outdir = Path(opt.outdir)
    everything = torch.cat(images)
    if not opt.skip_save:
        inference.save_samples(everything, outdir / "samples")
    if not opt.skip_grid:
        n_rows = opt.n_rows or opt.n_samples
        print(f"grid: {inference.save_grid(everything, outdir, n_rows)}")
    print(f"samples: {outdir / 'samples'}")


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[torch.Tensor]:
    opt = get_parser().parse_args(argv)
    if opt.ddim_eta and opt.sampler != "ddim":
        sys.exit(
            f"txt2img.py: --ddim_eta {opt.ddim_eta} is DDIM's; --{opt.sampler} is deterministic "
            "(drop --ddim_eta, or use --sampler ddim)"
        )
    model, device, batches = setup(opt, "txt2img.py")
    sampler = SAMPLERS[opt.sampler](model)
    shape = latent_shape(opt, model)
    start_code = None
    if opt.fixed_code:
        start_code = torch.randn((opt.n_samples, *shape), device=device)
    images = []
    with inference.precision_scope(opt.precision, device):
        for _ in range(opt.n_iter):
            for prompts in batches:
                cond, uncond = conditionings(model, prompts, opt.scale)
                x_T = None if start_code is None else start_code[: len(prompts)]
                latents, _ = sampler.sample(
                    S=opt.ddim_steps, batch_size=len(prompts), shape=shape, conditioning=cond,
                    unconditional_guidance_scale=opt.scale, unconditional_conditioning=uncond,
                    x_T=x_T, guidance_rescale=opt.guidance_rescale, eta=opt.ddim_eta,
                )  # fmt: skip
                images.append(model.decode_first_stage(latents).float().clamp(-1, 1))
    save(opt, images)
    return images


if __name__ == "__main__":
    main()
