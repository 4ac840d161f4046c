"""The embedded demo: train the tiny autoencoder, then the tiny text-to-image model on its
latents, on the synthetic shapes; write sample grids and the prompt-adherence score.

    python scripts/demo.py [--ae_steps 1000] [--ldm_steps 3500] [--outdir outputs/demo]

Everything runs on the CPU. The autoencoder trains under bf16 autocast where the CPU has bf16
instructions (--ae_precision auto), in fp32 elsewhere; the text-to-image model in fp32 (its
matrices are too small for bf16 to pay). The text-to-image run trains on latents and text
embeddings encoded once, before it starts (configs/tiny/cached.yaml), into
--logdir/demo-latent-cache; a later demo whose autoencoder came out the same reuses them.
Runs go to --logdir (logs/), pictures and scores to --outdir:
`samples.png` and `captions.txt` (the final model), `demo.json` (its scores and the minutes of
each phase), `autoencoder_loss.png` and `txt2img_loss.png` (the runs' loss curves) and, when the
text-to-image run saved several step checkpoints, `accuracy.png` (each checkpoint's scores
against its step; the samples and `curve.json` in `curve/`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as train  # noqa: E402
from ldm.checkpoint import last_checkpoint, step_checkpoints  # noqa: E402
from ldm.plots import line_plot  # noqa: E402
from ldm.progress import LOSS_PLOT  # noqa: E402
from scripts import evaluate  # noqa: E402

logger = logging.getLogger("demo")
CACHE_DIR = "demo-latent-cache"  # under --logdir: the autoencoder's latents of the data set
ACCURACY_KEYS = {"colour": "color", "shape": "shape", "background": "background", "all": "all"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ae_steps", type=int, default=1000)
    parser.add_argument(
        "--ae_precision",
        choices=["auto", "32", "bf16-mixed"],
        default="auto",
        help="the autoencoder's training precision; auto: bf16-mixed where the CPU computes "
        "bf16 natively (AVX512-BF16 or AMX), else 32",
    )
    parser.add_argument("--ldm_steps", type=int, default=3500)
    parser.add_argument("--logdir", default="logs")
    parser.add_argument("--outdir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--n_per_prompt", type=int, default=4, help="images per evaluation prompt")
    parser.add_argument("--eval_steps", type=int, default=50, help="DDIM steps when evaluating")
    parser.add_argument(
        "--curve_n_per_prompt",
        type=int,
        default=1,
        help="images per prompt for each step checkpoint of accuracy.png (0: no curve)",
    )
    parser.add_argument(
        "--ckpt_every",
        type=int,
        help="text-to-image step checkpoint every N steps (default: the config's, 500)",
    )
    return parser


def run(configs: list[str], name: str, steps: int, opt, *overrides: str) -> Path:
    """Train one stage with main.py from `configs` (merged in order); return its log dir."""
    trainer = train.main(
        [
            "--base",
            *(str(ROOT / "configs" / "tiny" / config) for config in configs),
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


def score(logdir: Path, outdir: Path, opt, n_per_prompt: int, curve: bool = False):
    """evaluate.py's scores of the run's last checkpoint, or with `curve` of each step one."""
    with torch.no_grad():
        return evaluate.main(
            [
                "--logdir",
                str(logdir),
                "--outdir",
                str(outdir),
                "--steps",
                str(opt.eval_steps),
                "--n_per_prompt",
                str(n_per_prompt),
                *(["--curve"] if curve else []),
            ]
        )


def accuracy_plot(curve: list[dict], path: Path) -> None:
    """Each accuracy of the step checkpoints against their step."""
    steps = [point["step"] for point in curve]
    series = {name: (steps, [p[key] for p in curve]) for name, key in ACCURACY_KEYS.items()}
    title = f"prompt adherence ({curve[0]['n_images']} images per checkpoint)"
    line_plot(series, path, title=title, ylabel="accuracy", y_range=(0, 1))


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): on such a CPU the demo
    autoencoder's steps measured 1.7x faster under bf16 autocast; without them bf16 has no
    instructions of its own, so the demo keeps fp32 there."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autoencoder_precision(choice: str) -> str:
    """The Trainer precision of --ae_precision `choice` on this machine."""
    if choice != "auto":
        return choice
    return "bf16-mixed" if native_bf16() else "32"


class Phases:
    """Minutes of each phase of the demo, logged as each ends."""

    def __init__(self):
        self.minutes: dict[str, float] = {}
        self.start = time.time()

    def done(self, name: str, detail: str = "") -> None:
        now = time.time()
        self.minutes[name] = round((now - self.start) / 60, 1)
        logger.info("demo: %s took %.0f s %s", name, now - self.start, detail)
        self.start = now


def main(argv: list[str] | None = None) -> dict:
    opt = get_parser().parse_args(argv)
    outdir, start, phases = Path(opt.outdir), time.time(), Phases()
    outdir.mkdir(parents=True, exist_ok=True)
    ae_precision = autoencoder_precision(opt.ae_precision)
    ae_dir = run(
        ["autoencoder.yaml"],
        "demo-autoencoder",
        opt.ae_steps,
        opt,
        f"lightning.trainer.precision={ae_precision}",
    )
    phases.done("autoencoder", f"({ae_dir}, precision {ae_precision})")
    every = [f"lightning.modelcheckpoint.params.every_n_train_steps={opt.ckpt_every}"]
    ldm_dir = run(
        ["txt2img.yaml", "cached.yaml"],
        "demo-txt2img",
        opt.ldm_steps,
        opt,
        f"model.params.first_stage_config.params.ckpt_path={last_checkpoint(ae_dir)}",
        f"lightning.callbacks.latent_cache.params.dir={Path(opt.logdir) / CACHE_DIR}",
        *(every if opt.ckpt_every else []),
    )
    phases.done("txt2img", f"({ldm_dir})")
    train_minutes = (time.time() - start) / 60
    for name, logdir in (("autoencoder", ae_dir), ("txt2img", ldm_dir)):
        if (logdir / LOSS_PLOT).is_file():
            shutil.copy(logdir / LOSS_PLOT, outdir / f"{name}_loss.png")
    scores = score(ldm_dir, outdir, opt, opt.n_per_prompt)
    phases.done("scoring", f"({scores['n_images']} images)")
    if opt.curve_n_per_prompt > 0 and len(step_checkpoints(ldm_dir)) > 1:
        curve = score(ldm_dir, outdir / "curve", opt, opt.curve_n_per_prompt, curve=True)
        accuracy_plot(curve, outdir / "accuracy.png")
        phases.done("curve", f"({len(curve)} checkpoints)")
    result = {
        **scores,
        "autoencoder_minutes": phases.minutes["autoencoder"],
        "autoencoder_precision": ae_precision,
        "training_minutes": round(train_minutes, 1),
        **{f"{name}_minutes": m for name, m in phases.minutes.items() if name != "autoencoder"},
        "total_minutes": round((time.time() - start) / 60, 1),
    }
    (outdir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"samples: {outdir / 'samples.png'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
