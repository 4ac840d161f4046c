"""The embedded demo: train the tiny autoencoder, then the tiny text-to-image model on its
latents, on the synthetic shapes; write sample grids and the prompt-adherence score.

    python scripts/demo.py [--ae_steps 1000] [--ldm_steps 3500] [--outdir outputs/demo]

Everything runs on the CPU. Runs go to --logdir (logs/), pictures and scores to --outdir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as train  # noqa: E402
from ldm.checkpoint import last_checkpoint  # noqa: E402
from scripts import evaluate  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ae_steps", type=int, default=1000)
    parser.add_argument("--ldm_steps", type=int, default=3500)
    parser.add_argument("--logdir", default="logs")
    parser.add_argument("--outdir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--n_per_prompt", type=int, default=4, help="images per evaluation prompt")
    parser.add_argument("--eval_steps", type=int, default=50, help="DDIM steps when evaluating")
    return parser


def run(config: str, name: str, steps: int, opt, *overrides: str) -> Path:
    """Train one stage with main.py and return its log dir."""
    trainer = train.main(
        [
            "--base",
            str(ROOT / "configs" / "tiny" / config),
            "-t",
            "-n",
            name,
            "--no-test",
            "-l",
            opt.logdir,
            "-s",
            str(opt.seed),
            "--max_steps",
            str(steps),
            *overrides,
        ]
    )
    return Path(trainer.default_root_dir)


def main(argv: list[str] | None = None) -> dict:
    opt = get_parser().parse_args(argv)
    start = time.time()
    ae_dir = run("autoencoder.yaml", "demo-autoencoder", opt.ae_steps, opt)
    ae_ckpt = last_checkpoint(ae_dir)
    ae_minutes = (time.time() - start) / 60
    ldm_dir = run(
        "txt2img.yaml",
        "demo-txt2img",
        opt.ldm_steps,
        opt,
        f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}",
    )
    train_minutes = (time.time() - start) / 60
    with torch.no_grad():
        scores = evaluate.main(
            [
                "--logdir",
                str(ldm_dir),
                "--outdir",
                opt.outdir,
                "--steps",
                str(opt.eval_steps),
                "--n_per_prompt",
                str(opt.n_per_prompt),
            ]
        )
    result = {
        **scores,
        "autoencoder_minutes": round(ae_minutes, 1),
        "training_minutes": round(train_minutes, 1),
        "total_minutes": round((time.time() - start) / 60, 1),
    }
    Path(opt.outdir, "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"samples: {Path(opt.outdir) / 'samples.png'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
