"""Training recipes on the embedded demo: the same steps and seed for each, then prompt adherence.

    python bench/recipes.py --ae_ckpt logs/<demo-autoencoder>/checkpoints/last.ckpt \
        [--steps 3500] [--recipes sd,min_snr,zero_snr,...]   # default: all of RECIPES

Each recipe trains configs/tiny/txt2img.yaml through main.py with its overrides on the given
first stage, then scores it with scripts/evaluate.py (DDIM 50 steps, guidance 3, eta 0 and 1).
Prints one JSON object per recipe and, at the end, a Markdown table. Runs one at a time: on
2 CPU cores two trainings at once are each several times slower.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as train  # noqa: E402
from scripts import evaluate  # noqa: E402

P = "model.params."
SD = [f"{P}beta_schedule=linear", f"{P}parameterization=eps", f"{P}min_snr_gamma=null"]
TINY = [f"{P}beta_schedule=cosine", f"{P}parameterization=v", f"{P}min_snr_gamma=5.0"]
RECIPES = {
    "sd": SD,  # Stable Diffusion's own: linear (in sqrt beta) schedule, eps
    "v": [*SD[:1], f"{P}parameterization=v", SD[2]],
    "cosine_v": [*TINY[:2], f"{P}min_snr_gamma=null"],
    "min_snr": TINY,  # the tiny config as shipped
    "offset_noise": [*TINY, f"{P}offset_noise_strength=0.1"],
    "immiscible": [*TINY, f"{P}immiscible=true"],
    "sigmoid_v": [f"{P}beta_schedule=sigmoid", *TINY[1:]],
    "zero_snr": [*TINY, f"{P}zero_terminal_snr=true"],
    "self_cond": [*TINY, f"{P}self_conditioning=true", f"{P}unet_config.params.in_channels=8"],
    "all": [*TINY, f"{P}offset_noise_strength=0.1", f"{P}immiscible=true"],
}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ae_ckpt", required=True, help="the demo autoencoder's last.ckpt")
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--logdir", default="logs/recipes")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--n_per_prompt", type=int, default=4)
    return parser


def final_train_loss(trainer, last: int = 10) -> float:
    """Mean train/loss_simple of the last `last` logged steps (the CSV logger's file), or the
    last value Lightning holds when the run was too short to log any."""
    logged = list(Path(trainer.default_root_dir).glob("csv/*/metrics.csv"))
    values = []
    if logged:
        with logged[0].open() as f:
            values = [
                float(r["train/loss_simple"]) for r in csv.DictReader(f) if r["train/loss_simple"]
            ]
    if not values:
        return float(trainer.callback_metrics["train/loss_simple"])
    return sum(values[-last:]) / len(values[-last:])


def run_recipe(name: str, opt) -> dict:
    start = time.time()
    trainer = train.main(
        [
            "--base",
            str(ROOT / "configs" / "tiny" / "txt2img.yaml"),
            "-t",
            "-n",
            f"recipe-{name}",
            "--no-test",
            "-l",
            opt.logdir,
            "-s",
            str(opt.seed),
            "--max_steps",
            str(opt.steps),
            f"{P}first_stage_config.params.ckpt_path={opt.ae_ckpt}",
            *RECIPES[name],
        ]
    )
    minutes = (time.time() - start) / 60
    logdir = Path(trainer.default_root_dir)
    result = {
        "recipe": name,
        "steps": opt.steps,
        "train_minutes": round(minutes, 1),
        "final_loss_simple": round(final_train_loss(trainer), 4),
    }
    for eta in (0.0, 1.0):
        scores = evaluate.main(
            [
                "--logdir",
                str(logdir),
                "--outdir",
                str(logdir / f"evaluate-eta{eta:g}"),
                "--eta",
                str(eta),
                "--n_per_prompt",
                str(opt.n_per_prompt),
            ]
        )
        result[f"eta{eta:g}"] = {k: round(scores[k], 3) for k in ("color", "shape", "background")}
    return result


def table(results: list[dict]) -> str:
    rows = [
        "| recipe | loss_simple | minutes | colour / shape / background, eta 0 | eta 1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cells = [" / ".join(f"{100 * v:.0f} %" for v in r[k].values()) for k in ("eta0", "eta1")]
        rows.append(
            f"| {r['recipe']} | {r['final_loss_simple']} | {r['train_minutes']} | "
            f"{cells[0]} | {cells[1]} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    opt = get_parser().parse_args(argv)
    names = opt.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"recipes.py: unknown recipes {unknown}; known: {list(RECIPES)}")
    results = []
    for name in names:
        results.append(run_recipe(name, opt))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
