"""Images per second of main.py's training loop on the tiny config, with and without the cache.

    python -m bench.train_loop [--steps 60] [--warmup 10] [--precision 32] [--repeats 1]
        [key=value ...]   # config overrides for both runs, as main.py takes them

Trains configs/tiny/txt2img.yaml through `main.main` (data loading, Lightning loop, EMA,
logging) first as shipped, then on cached latents and text embeddings (configs/tiny/
cached.yaml; the time to build the cache is reported apart). Validation, image logging and
checkpoints are kept out of the timed steps. Prints one JSON object per run and one summary.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

import main as train
from bench.common import ROOT, emit, environment
from ldm.util import get_obj_from_str

# By import path: run as `python -m bench.train_loop` this module is __main__, not the one
# main.py instantiates the callback from.
CLOCK = "bench.train_loop.StepClock"


class StepClock(pl.Callback):
    """Wall time at the end of every training batch."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--steps", type=int, default=60)
    add("--warmup", type=int, default=10, help="steps left out of the rate")
    add("--precision", default="32", choices=["32", "bf16-mixed"])
    add("--repeats", type=int, default=1, help="runs of each, alternating")
    return parser


QUIET = [
    "lightning.trainer.limit_val_batches=0",
    "lightning.trainer.val_check_interval=null",
    "lightning.callbacks.image_logger.params.batch_frequency=1000000",
    "lightning.modelcheckpoint.params.every_n_train_steps=1000000",
    "lightning.trainer.enable_progress_bar=false",
    "lightning.trainer.enable_model_summary=false",
    f"lightning.callbacks.step_clock.target={CLOCK}",
]


def timed_run(opt, logs: Path, configs: list[str], overrides: list[str]) -> dict:
    """Images/s of `main.py --base configs -t` over the steps after the warm-up, and the
    seconds to the first step's end (model, data, cache build)."""
    start = time.perf_counter()
    argv = ["--base", *configs, "-t", "--no-test", "-l", str(logs), "--max_steps", str(opt.steps)]
    trainer = train.main([*argv, "--precision", opt.precision, *QUIET, *overrides])
    (clock,) = [c for c in trainer.callbacks if isinstance(c, get_obj_from_str(CLOCK))]
    ends = clock.ends[opt.warmup :]
    batch = trainer.datamodule.batch_size
    rate = batch * (len(ends) - 1) / (ends[-1] - ends[0])
    return {
        "images_per_s": round(rate, 1),
        "step_ms": round(1000 * batch / rate, 1),
        "seconds_to_first_step": round(clock.ends[0] - start, 1),
        "batch": batch,
        "precision": opt.precision,
    }


def run(opt, workdir: Path, cached: bool, extra: list[str]) -> dict:
    configs, overrides = [str(ROOT / "configs/tiny/txt2img.yaml")], list(extra)
    if cached:
        configs.append(str(ROOT / "configs/tiny/cached.yaml"))
        overrides.append(f"lightning.callbacks.latent_cache.params.dir={workdir / 'cache'}")
    return {"cached": cached, **timed_run(opt, workdir / "logs", configs, overrides)}


def main(argv: list[str] | None = None) -> dict:
    opt, extra = get_parser().parse_known_args(argv)
    if opt.steps - opt.warmup < 2:
        raise SystemExit("train_loop.py: --steps must exceed --warmup by at least 2")
    emit({"bench": "train_loop", **environment()})
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(opt.repeats):
            for cached in (False, True):
                record = run(opt, Path(workdir), cached, extra)
                emit(record)
                rates[cached].append(record["images_per_s"])
    best = {k: max(v) for k, v in rates.items()}
    summary = {"speedup_cached": round(best[True] / best[False], 3), "images_per_s": best}
    emit(summary)
    return summary


if __name__ == "__main__":
    main()
