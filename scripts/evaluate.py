"""Score prompt adherence of a model trained on the synthetic shapes; print the result as JSON.

    python scripts/evaluate.py --logdir logs/<run> [--n_per_prompt 4] [--steps 50] [--scale 3]
    python scripts/evaluate.py --logdir logs/<run> --eta 0      # deterministic DDIM instead
    python scripts/evaluate.py --logdir logs/<run> --curve     # every saved checkpoint

Each (colour, shape) pair of the data set is prompted `n_per_prompt` times on a random other
background; the judge (`ldm.data.shapes_judge.judge`) reads colour, shape and background off each
image. The grid of generated images is saved under --outdir with its captions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm import inference  # noqa: E402
from ldm.callbacks import to_uint8_grid  # noqa: E402
from ldm.checkpoint import (  # noqa: E402
    UNSAFE_PICKLE_FLAG,
    CheckpointError,
    run_files,
    saved_configs,
    step_checkpoints,
)
from ldm.data.shapes_judge import accuracy, judge, prompt_grid, to_uint8  # noqa: E402
from ldm.data.synthetic import SyntheticShapes  # noqa: E402
from ldm.models.diffusion import sampling  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", required=True, help="a main.py log dir of a txt2img run")
    parser.add_argument("--ckpt", help="checkpoint in it to use (default: checkpoints/last.ckpt)")
    parser.add_argument("--n_per_prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument(
        "--eta",
        type=float,
        default=1.0,
        help="DDIM eta: 1 adds DDPM's posterior noise each step (scores best here), 0 none",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outdir", default="outputs/evaluate")
    parser.add_argument(
        "--curve",
        action="store_true",
        help="score every step checkpoint of the run: accuracy against training minutes",
    )
    parser.add_argument(
        UNSAFE_PICKLE_FLAG,
        action="store_true",
        help="unpickle objects in a .ckpt (runs their code: only for files you trust)",
    )
    return parser


@torch.no_grad()
def generate(
    model, captions: list[str], steps: int, scale: float, seed: int, eta: float = 0.0
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for `captions`, from EMA weights, DDIM with guidance."""
    generator = torch.Generator(model.device).manual_seed(seed)
    with model.ema_scope():
        cond = model.get_learned_conditioning(captions)
        uncond = model.get_learned_conditioning([""] * len(captions))
        latents = sampling.sample(
            model,
            cond,
            uncond,
            steps=steps,
            guidance_scale=scale,
            eta=eta,
            batch_size=len(captions),
            generator=generator,
        )
        return model.decode_first_stage(latents)


def evaluate(model, data: SyntheticShapes, opt):
    """(accuracies, generated images (N, 3, H, W), captions, labels) over the prompt grid."""
    labels = [label for label in prompt_grid(data, opt.seed) for _ in range(opt.n_per_prompt)]
    captions = [data.caption(*label) for label in labels]
    images = generate(model, captions, opt.steps, opt.scale, opt.seed, opt.eta)
    verdicts = [judge(image, data) for image in to_uint8(images)]
    return accuracy(verdicts, labels), images, captions, labels


def score_checkpoint(opt, ckpt: Path | None, outdir: Path) -> dict:
    """Scores of one checkpoint of the run; its sample grid and captions go to `outdir`."""
    start = time.time()
    try:
        configs, last = run_files(opt.logdir)
        # the run's EMA weights, swapped in at load: generate()'s ema_scope has nothing to swap
        model, config = inference.load_model(ckpt or last, configs, unsafe_pickle=opt.unsafe_pickle)
    except CheckpointError as err:
        sys.exit(f"evaluate.py: {err}")
    data = instantiate_from_config(config.data.params.train)
    if not isinstance(data, SyntheticShapes):
        sys.exit(f"evaluate.py: {opt.logdir} trained on {type(data).__name__}, not SyntheticShapes")
    scores, images, captions, _ = evaluate(model, data, opt)
    outdir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_grid(images, nrow=opt.n_per_prompt)).save(outdir / "samples.png")
    (outdir / "captions.txt").write_text("\n".join(captions) + "\n")
    return {
        **scores,
        "n_images": len(captions),
        "steps": opt.steps,
        "scale": opt.scale,
        "eta": opt.eta,
        "seconds": round(time.time() - start, 1),
        "logdir": str(opt.logdir),
    }


def training_curve(opt) -> list[dict]:
    """Scores of every step checkpoint, with minutes since the run started."""
    logdir = Path(opt.logdir)
    started = min(p.stat().st_mtime for p in saved_configs(logdir))
    curve = []
    for step, ckpt in step_checkpoints(logdir):
        minutes = round((ckpt.stat().st_mtime - started) / 60, 1)
        scores = score_checkpoint(opt, ckpt, Path(opt.outdir) / f"step-{step:06}")
        curve.append({"step": step, "minutes": minutes, **scores})
        print(json.dumps(curve[-1]))
    return curve


def main(argv: list[str] | None = None) -> dict | list[dict]:
    opt = get_parser().parse_args(argv)
    result = training_curve(opt) if opt.curve else score_checkpoint(opt, opt.ckpt, Path(opt.outdir))
    Path(opt.outdir).mkdir(parents=True, exist_ok=True)
    name = "curve.json" if opt.curve else "accuracy.json"
    (Path(opt.outdir) / name).write_text(json.dumps(result, indent=2) + "\n")
    if not opt.curve:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
