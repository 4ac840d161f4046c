"""Teach the embedded demo's model a shape word it never saw, with LoRA DreamBooth; measure
that it follows the new word and forgets nothing else, with and without prior preservation.

    python scripts/demo.py                                   # the base model, once
    python scripts/demo_dreambooth.py --base_run logs/<time>_demo-txt2img

1. The base run's EMA weights become one file, the base (as released models are).
2. Instance images: a handful of diamonds with captions ("a red diamond on a blue
   background"); the base's data never had the word or the shape (`DEFAULT_SHAPES`). A new
   colour would not do: the demo's autoencoder, trained on six colours, cannot draw a
   seventh, while it redraws diamonds (its ceiling is measured and reported).
3. Class images: the base model's own samples for the demo's prompts, with those prompts as
   captions, written once (a rerun reuses them).
4. LoRA training on the instance images, with the class images as the prior (loss_weight 1)
   and without them.
5. Scores, with the demo's judge: the new concept (diamond prompts: colour, shape,
   background) and no forgetting (the demo's own 96-image prompt grid), for the base and
   both runs.
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
from ldm.data.synthetic import DEFAULT_SHAPES, SyntheticShapes  # noqa: E402
from scripts import convert, evaluate  # noqa: E402

NEW_SHAPE = "diamond"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--base_run", required=True, help="the demo's text-to-image log dir (scripts/demo.py)")
    add("--outdir", default="outputs/demo-dreambooth")
    add("--logdir", default="logs")
    add("--steps", type=int, default=800, help="LoRA training steps per run")
    add("--instances", type=int, default=12, help="instance images of the new concept")
    add("--class_per_prompt", type=int, default=4, help="class images per demo prompt")
    add("--n_per_prompt", type=int, default=4, help="images per prompt when scoring")
    add("--eval_steps", type=int, default=50, help="DDIM steps when scoring")
    add("--seed", type=int, default=23)
    return parser


def new_concept_data() -> SyntheticShapes:
    """The shapes data set with the new shape among the judge's shapes."""
    return SyntheticShapes(shapes=[*DEFAULT_SHAPES, NEW_SHAPE])


def new_concept_labels(data: SyntheticShapes, n: int, rng: np.random.Generator) -> list[tuple]:
    """`n` (colour, diamond, background) labels, the colours in turn, the background another."""
    colours, shape = len(data.color_names), data.shape_names.index(NEW_SHAPE)
    labels = []
    for i in range(n):
        colour = i % colours
        labels.append((colour, shape, (colour + 1 + int(rng.integers(colours - 1))) % colours))
    return labels


def render(data: SyntheticShapes, labels: list[tuple], rng: np.random.Generator) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] of the labels, as the data set draws them."""
    return torch.stack(
        [torch.from_numpy(data.render(*label, rng)).permute(2, 0, 1) for label in labels]
    )


def write_instances(folder: Path, data: SyntheticShapes, n: int, seed: int) -> None:
    """`n` diamonds in every colour on other colours, with their captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = new_concept_labels(data, n, rng)
    for i, (label, pixels) in enumerate(
        zip(labels, to_uint8(render(data, labels, rng)), strict=True)
    ):
        Image.fromarray(pixels).save(folder / f"{i:03}.png")
        (folder / f"{i:03}.txt").write_text(data.caption(*label))


def autoencoder_ceiling(model, opt) -> dict:
    """The judge's scores of the first stage's reconstructions of diamonds: the best any
    sampler of this model can reach on the new concept."""
    data, rng = new_concept_data(), np.random.default_rng(opt.seed + 2)
    labels = new_concept_labels(data, 6 * opt.n_per_prompt * 4, rng)
    images = render(data, labels, rng).to(model.device)
    posterior = model.encode_first_stage(images)
    reconstructions = model.decode_first_stage(model.get_first_stage_encoding(posterior.mode()))
    return accuracy([judge(image, data) for image in to_uint8(reconstructions)], labels)


def write_class_images(folder: Path, model, opt) -> None:
    """The base model's samples for the demo's prompts, captioned with them (kept if there)."""
    data = SyntheticShapes()
    labels = [label for label in prompt_grid(data, opt.seed) for _ in range(opt.class_per_prompt)]
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(labels):
        return
    folder.mkdir(parents=True, exist_ok=True)
    captions = [data.caption(*label) for label in labels]
    images = evaluate.generate(model, captions, opt.eval_steps, 3.0, opt.seed + 1, eta=1.0)
    for i, (image, caption) in enumerate(zip(to_uint8(images), captions, strict=True)):
        Image.fromarray(image).save(folder / f"{i:03}.png")
        (folder / f"{i:03}.txt").write_text(caption)


def concept_scores(model, opt, name: str) -> dict:
    """Colour, shape and background accuracy for diamond prompts, judged with diamonds known;
    the images go to outdir/<name>-new-concept.png, one row a colour."""
    data = new_concept_data()
    labels = new_concept_labels(data, 6 * opt.n_per_prompt * 4, np.random.default_rng(opt.seed))
    labels.sort(key=lambda label: label[0])
    captions = [data.caption(*label) for label in labels]
    images = evaluate.generate(model, captions, opt.eval_steps, 3.0, opt.seed, eta=1.0)
    grid = to_uint8_grid(images, nrow=opt.n_per_prompt * 4)
    Image.fromarray(grid).save(Path(opt.outdir) / f"{name}-new-concept.png")
    return accuracy([judge(image, data) for image in to_uint8(images)], labels)


def scores(model, opt, name: str) -> dict:
    """The new concept's scores and the demo's own (no forgetting); grids under outdir."""
    eval_opt = argparse.Namespace(
        n_per_prompt=opt.n_per_prompt, steps=opt.eval_steps, scale=3.0, eta=1.0, seed=opt.seed
    )
    old, images, _, _ = evaluate.evaluate(model, SyntheticShapes(), eval_opt)
    grid = to_uint8_grid(images, nrow=opt.n_per_prompt)
    Image.fromarray(grid).save(Path(opt.outdir) / f"{name}-demo-prompts.png")
    return {"new_concept": concept_scores(model, opt, name), "demo_prompts": old}


def fine_tune(opt, name: str, base_file: Path, folders: dict[str, Path], prior: bool) -> Path:
    """One LoRA DreamBooth run through main.py; its log dir."""
    overlay = OmegaConf.load(ROOT / "configs/tiny/dreambooth.yaml")
    config = OmegaConf.merge(OmegaConf.load(ROOT / "configs/tiny/txt2img.yaml"), overlay)
    config.data = overlay.data  # replaced, not merged: the synthetic set's params would stay
    sources = config.data.params.train.params.sources
    sources[0].dataset.params.root = str(folders["instance"])
    sources[1].dataset.params.root = str(folders["class"])
    if not prior:
        config.data.params.train.params.sources = [sources[0]]
    path = Path(opt.outdir) / f"{name}.yaml"
    OmegaConf.save(config, path)
    trainer = train.main(
        ["--base", str(path), "-t", "--no-test", "-n", name, "-l", opt.logdir, "-s", str(opt.seed)]
        + ["--finetune_from", str(base_file), "--max_steps", str(opt.steps)]
    )
    return Path(trainer.default_root_dir)


def main(argv: list[str] | None = None) -> dict:
    opt = get_parser().parse_args(argv)
    out = Path(opt.outdir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    base_file = out / "base.safetensors"
    convert.main(["--ckpt", opt.base_run, "--use_ema", "--out", str(base_file)])
    folders = {"instance": out / "instance", "class": out / "class"}
    write_instances(folders["instance"], new_concept_data(), opt.instances, opt.seed)
    base, _ = inference.load_model(opt.base_run)
    with torch.no_grad():
        write_class_images(folders["class"], base, opt)
        result = {"autoencoder_ceiling": autoencoder_ceiling(base, opt)}
        result["base"] = scores(base, opt, "base")
    for name, prior in (("with-prior", True), ("without-prior", False)):
        began = time.time()
        run = fine_tune(opt, f"dreambooth-{name}", base_file, folders, prior)
        model, _ = inference.load_model(run)
        with torch.no_grad():
            result[name] = {
                **scores(model, opt, name),
                "minutes": round((time.time() - began) / 60, 1),
            }
    result["total_minutes"] = round((time.time() - start) / 60, 1)
    (out / "dreambooth.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
