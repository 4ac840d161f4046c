"""What the sampling command lines share: their flags, model loading and prompt reading, the
device and precision choices, and writing the images.

`txt2img.py` and `img2img.py` import this as `scripts.common` (run as commands they first put
the repository root on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError
from pytorch_lightning import seed_everything
from torchvision.utils import make_grid

from ldm import inference
from ldm.checkpoint import UNSAFE_PICKLE_FLAG, run_files
from ldm.models.diffusion import adapters
from ldm.models.diffusion.conditioning import (
    AESTHETIC_KEY,
    CROP_KEY,
    ORIGINAL_SIZE_KEY,
    TARGET_SIZE_KEY,
)
from ldm.modules.acceleration import compile_forward
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]

DEVICES = ("cuda", "cpu", "mps")
DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
# SDXL's flags, and the refiner's aesthetic scores as its scripts and diffusers default them.
SDXL_FLAGS = ("original_size", "crop", "target_size", "aesthetic_score", "negative_aesthetic_score")
AESTHETIC, NEGATIVE_AESTHETIC = 6.0, 2.5


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
    add(
        "--guidance_rescale",
        type=float,
        default=0.0,
        help="guidance rescale phi of Lin et al. (0.7 for zero-SNR models; 0: off)",
    )
    add("--from-file", dest="from_file", help="a text file of prompts, one per line, batched")
    add("--config", nargs="+", help="model config (default: the log dir's, else v1-inference.yaml)")
    add(
        "--ckpt",
        default="models/ldm/stable-diffusion-v1/model.ckpt",
        help="checkpoint (.ckpt / .safetensors) or a main.py log dir",
    )
    add("--seed", type=int, default=42, help="seed for reproducible sampling")
    add(
        "--precision",
        choices=["full", "autocast"],
        default="autocast",
        help="autocast: fp16 on GPUs, bf16 on the CPU; full: fp32",
    )
    add("--device", choices=DEVICES, help="default: cuda, else mps, else cpu")
    add(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample with the EMA weights when the checkpoint has them",
    )
    add(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (worth it for many batches; falls back to eager)",
    )
    add(
        UNSAFE_PICKLE_FLAG,
        action="store_true",
        help="unpickle objects in a .ckpt (runs their code: only for files you trust)",
    )
    add_lora_arg(parser)


def add_lora_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        type=adapters.parse_lora_arg,
        metavar="FILE[:SCALE]",
        help="merge a LoRA file in the kohya / AUTOMATIC1111 layout into the model, SCALE times "
        "(default 1); repeatable",
    )


def merge_lora_files(model, loras: list[tuple[str, float]]) -> None:
    for path, scale in loras:
        adapters.load_lora_file(model, path, scale)


def setup(opt, script: str, default_config: Path = DEFAULT_CONFIG):
    """(model, device, prompt batches) for the options; bad options exit naming them.
    `default_config` is the config of a file that is not a main.py run (SD v1's, as the
    original's scripts)."""
    try:
        batches = read_prompts(opt.prompt, opt.from_file, opt.n_samples)
        config = opt.config
        if config is None and not run_files(opt.ckpt)[0]:
            config = [default_config]
        device = choose_device(opt.device)
        model, _ = inference.load_model(
            opt.ckpt, config, use_ema=opt.use_ema, device=device, unsafe_pickle=opt.unsafe_pickle
        )
        merge_lora_files(model, opt.lora)
        prepare_for_precision(model, opt.precision, device)
        if opt.compile:
            compile_forward(model.model.diffusion_model, "the UNet")
    except (ValueError, OSError, RuntimeError) as err:
        sys.exit(f"{script}: {err}")
    seed_everything(opt.seed, verbose=False)
    return model, device, batches


def sampling_options(opt) -> dict:
    """The sampling flags txt2img.py and img2img.py share, as `sampling` keyword arguments."""
    return {
        "steps": opt.ddim_steps,
        "guidance_scale": opt.scale,
        "guidance_rescale": opt.guidance_rescale,
        "eta": opt.ddim_eta,
    }


def add_sdxl_args(parser: argparse.ArgumentParser) -> None:
    """SDXL's micro-conditioning flags, defaulting as its own scripts do."""
    group = parser.add_argument_group("SDXL micro-conditioning (DiffusionEngine models only)")
    add = group.add_argument
    add("--original_size", type=int, nargs=2, metavar=("H", "W"), help="default: the image's size")
    add("--crop", type=int, nargs=2, metavar=("TOP", "LEFT"), help="crop corner (default 0 0)")
    add("--target_size", type=int, nargs=2, metavar=("H", "W"), help="default: the image's size")
    add("--aesthetic_score", type=float, help=f"the refiner's, of the prompt (default {AESTHETIC})")
    add(
        "--negative_aesthetic_score",
        type=float,
        help=f"the refiner's, of the unconditional branch (default {NEGATIVE_AESTHETIC})",
    )


def micro_conditioning(opt, model, size: tuple[int, int]) -> tuple[dict, dict]:
    """(cond's, uncond's) keyword arguments of an SDXL model's get_learned_conditioning for
    images of `size` (height, width); none for other models, which refuse the SDXL flags."""
    flags = {
        ORIGINAL_SIZE_KEY: opt.original_size,
        CROP_KEY: opt.crop,
        TARGET_SIZE_KEY: opt.target_size,
        AESTHETIC_KEY: opt.aesthetic_score,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if not hasattr(model, "conditioner"):
        names = [f"--{name}" for name in SDXL_FLAGS if getattr(opt, name) is not None]
        if names:
            raise ValueError(
                f"{', '.join(names)}: SDXL's micro-conditioning, which a "
                f"{type(model).__name__} does not take"
            )
        return {}, {}
    cond = {"size": size, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}}
    negative = opt.negative_aesthetic_score
    return cond, {**cond, AESTHETIC_KEY: NEGATIVE_AESTHETIC if negative is None else negative}


def conditionings(model, prompts: list[str], scale: float, micro: tuple[dict, dict] = ({}, {})):
    """(cond, uncond or None) for a batch of prompts; the empty prompt is the unconditional.
    `micro`: SDXL's size entries of each (`micro_conditioning`)."""
    cond_micro, uncond_micro = micro
    uncond = None
    if scale != 1.0:
        uncond = model.get_learned_conditioning(len(prompts) * [""], **uncond_micro)
    return model.get_learned_conditioning(prompts, **cond_micro), uncond


def save(opt, images: list[torch.Tensor]) -> None:
    """Single images and the grid of all of them, as the options say."""
    outdir = Path(opt.outdir)
    everything = torch.cat(images)
    if not opt.skip_save:
        save_samples(everything, outdir / "samples")
    if not opt.skip_grid:
        n_rows = opt.n_rows or opt.n_samples
        print(f"grid: {save_grid(everything, outdir, n_rows)}")
    print(f"samples: {outdir / 'samples'}")


def choose_device(name: str | None = None) -> torch.device:
    """The named device, or the best available: cuda, then mps, then cpu."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name not in DEVICES:
        raise ValueError(f"--device {name!r}: expected one of {DEVICES}")
    available = {"cuda": torch.cuda.is_available, "cpu": lambda: True}
    if not available.get(name, lambda: torch.backends.mps.is_available())():
        raise ValueError(f"--device {name}: not available on this machine")
    return torch.device(name)


def precision_scope(precision: str, device: torch.device):
    """ "autocast": fp16 autocast on CUDA / MPS, bf16 on the CPU; "full": plain fp32."""
    if precision == "full":
        return contextlib.nullcontext()
    if precision != "autocast":
        raise ValueError(f"--precision {precision!r}: expected 'autocast' or 'full'")
    return torch.autocast(device.type, dtype=autocast_dtype(device))


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the CPU (fp16 is slow there), fp16 on CUDA and MPS, as `--precision autocast`."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def prepare_for_precision(model, precision: str, device: torch.device) -> None:
    """With autocast, hold the UNet's weights in its dtype once: autocast would otherwise cast
    every weight on every sampling step (most of a CPU step for SD, bench/README.md)."""
    if precision == "autocast":
        model.model.to(autocast_dtype(device))


def read_prompts(prompt: str, from_file: str | None, batch_size: int) -> list[list[str]]:
    """Batches of prompts: `prompt` repeated batch_size times, or a file's lines in chunks."""
    if from_file is None:
        return [[prompt] * batch_size]
    path = Path(from_file)
    if not path.is_file():
        raise FileNotFoundError(f"--from-file {from_file}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--from-file {from_file}: no prompts in it (one per line)")
    return [lines[i : i + batch_size] for i in range(0, len(lines), batch_size)]


def next_index(directory: Path, pattern: str) -> int:
    """One past the files already in `directory` matching `pattern`: outputs never overwrite."""
    return len(list(directory.glob(pattern)))


def read_image(path: str | Path, what: str, mode: str = "RGB") -> Image.Image:
    """The image at `path` in `mode`; a ValueError naming `what` (e.g. --init-img) if unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{what} {path}: not a readable image ({err})") from err


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] from an RGB image."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)  # (H, W, 3)
    return pixels.permute(2, 0, 1)[None]


def add_demo_args(parser: argparse.ArgumentParser, outdir: str, steps: int) -> None:
    """The flags the inpainting and upscaling demos share: where, how long, how scored."""
    add = parser.add_argument
    add("--outdir", default=outdir)
    add("--logdir", default="logs")
    add("--steps", type=int, default=steps, help="training steps")
    add("--n_per_prompt", type=int, default=4, help="images per prompt when scoring")
    add("--eval_steps", type=int, default=50, help="DDIM steps when scoring")
    add("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    add("--seed", type=int, default=23)


def run_demo(opt, fit, evaluate, data_key: str, json_name: str) -> dict:
    """A demo that trains then scores: `fit(opt)` (a log dir), then `evaluate(model, data,
    opt)` on the run's data set at `data_key`; the scores, with the minutes taken, are written
    to --outdir/`json_name` and printed."""
    out = Path(opt.outdir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    run = fit(opt)
    train_minutes = round((time.time() - start) / 60, 1)
    model, config = inference.load_model(run)
    data = instantiate_from_config(OmegaConf.select(config, data_key))
    result = {**evaluate(model, data, opt), "train_minutes": train_minutes, "steps": opt.steps}
    result["total_minutes"] = round((time.time() - start) / 60, 1)
    (out / json_name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


def demo_sampling_flags(opt, **extra) -> SimpleNamespace:
    """The sampling flags inpaint.py's and upscale.py's functions read, for a demo's scoring:
    DDIM with eta 1 (as evaluate.py scores), the demo's --scale and --eval_steps, and `extra`."""
    return SimpleNamespace(
        scale=opt.scale,
        sampler="ddim",
        ddim_steps=opt.eval_steps,
        ddim_eta=1.0,
        guidance_rescale=0.0,
        **extra,
    )


def to_pil(images: torch.Tensor) -> Iterator[Image.Image]:
    """PIL images from (B, 3, H, W) in [-1, 1]."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
        yield Image.fromarray(np.ascontiguousarray(array))


def save_samples(images: torch.Tensor, directory: Path) -> list[Path]:
    """Each image as `directory/NNNNN.png`, numbered after those already there."""
    directory.mkdir(parents=True, exist_ok=True)
    start = next_index(directory, "[0-9][0-9][0-9][0-9][0-9].png")
    paths = []
    for i, image in enumerate(to_pil(images)):
        paths.append(directory / f"{start + i:05}.png")
        image.save(paths[-1])
    return paths


def save_grid(images: torch.Tensor, outdir: Path, n_rows: int) -> Path:
    """All images as one `outdir/grid-NNNN.png`, `n_rows` images per row, black between."""
    outdir.mkdir(parents=True, exist_ok=True)
    unit = (images.float().cpu().clamp(-1, 1) + 1) / 2
    grid = make_grid(unit, nrow=n_rows, padding=2)  # (3, H', W') in [0, 1]
    path = outdir / f"grid-{next_index(outdir, 'grid-*.png'):04}.png"
    next(to_pil(grid[None] * 2 - 1)).save(path)
    return path
