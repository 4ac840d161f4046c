"""What a main.py run keeps on disk and does without -t: the last K step checkpoints, the best
K by the model's `monitor`, and evaluation only when not training."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

import main

SMALL = [
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.modelcheckpoint.params.every_n_train_steps=1",
]


def run(tmp_path: Path, *args: str, drop: tuple[str, ...] = ("lightning.modelcheckpoint",)):
    """main.py on the tiny config less the `drop` sections (default: its checkpoint settings)."""
    config = OmegaConf.load(ROOT / "configs" / "tiny" / "txt2img.yaml")
    for dotted in drop:
        parent, _, key = dotted.rpartition(".")
        del OmegaConf.select(config, parent)[key]
    tmp_path.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, tmp_path / "config.yaml")
    return main.main(["--base", str(tmp_path / "config.yaml"), "-l", str(tmp_path), *SMALL, *args])


def step_checkpoints(trainer) -> list[str]:
    folder = Path(trainer.default_root_dir) / "checkpoints"
    return sorted(p.name for p in folder.glob("epoch=*-step=*.ckpt"))


def validation_losses(logdir: Path) -> dict[int, float]:
    """val/loss_simple_ema of each validation in the run's metrics.csv, by the step after it."""
    with open(next(logdir.glob("csv/**/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss_simple_ema")]
    return {int(r["step"]) + 1: float(r["val/loss_simple_ema"]) for r in rows}  # logged at step - 1


def best_checkpoint_steps(logdir: Path) -> list[int]:
    names = sorted(p.name for p in (logdir / "checkpoints").glob("best-*.ckpt"))
    return [int(name.split("step=")[1].split(".")[0]) for name in names]


def test_the_last_k_step_checkpoints_are_kept(tmp_path):
    no_val = "lightning.trainer.limit_val_batches=0"
    trainer = run(tmp_path / "a", "-t", "--max_steps", "5", no_val)
    kept = step_checkpoints(trainer)
    assert [name.split("step=")[1] for name in kept] == [
        "000000003.ckpt",
        "000000004.ckpt",
        "000000005.ckpt",
    ]
    assert (Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt").is_file()
    k = "lightning.modelcheckpoint.params.save_top_k"
    assert (
        len(step_checkpoints(run(tmp_path / "b", "-t", "--max_steps", "4", no_val, f"{k}=1"))) == 1
    )
    assert (
        len(step_checkpoints(run(tmp_path / "c", "-t", "--max_steps", "4", no_val, f"{k}=-1"))) == 4
    )


def test_monitor_keeps_the_best_k_by_the_validation_metric(tmp_path):
    trainer = run(
        tmp_path,
        "-t",
        "--max_steps",
        "5",
        "model.params.monitor=val/loss_simple_ema",
        "lightning.trainer.val_check_interval=1",
        "lightning.trainer.limit_val_batches=1",
        "lightning.modelcheckpoint.params.save_top_k=2",
        "model.base_learning_rate=1e-3",
    )
    logdir = Path(trainer.default_root_dir)
    losses = validation_losses(logdir)
    assert best_checkpoint_steps(logdir) == sorted(sorted(losses, key=losses.get)[:2])


def test_keeping_every_step_checkpoint_keeps_one_best_not_a_copy_of_each(tmp_path):
    """save_top_k -1 (the tiny config's, for the accuracy curve) keeps every step checkpoint;
    the best by the monitor is then the single best one, not a second copy of all of them."""
    trainer = run(
        tmp_path,
        "-t",
        "--max_steps",
        "4",
        "model.params.monitor=val/loss_simple_ema",
        "lightning.trainer.val_check_interval=1",
        "lightning.trainer.limit_val_batches=1",
        "lightning.modelcheckpoint.params.save_top_k=-1",
        "model.base_learning_rate=1e-3",
    )
    logdir = Path(trainer.default_root_dir)
    assert len(step_checkpoints(trainer)) == 4
    losses = validation_losses(logdir)
    assert best_checkpoint_steps(logdir) == [min(losses, key=losses.get)]


def test_without_t_main_evaluates_and_does_not_train(tmp_path):
    trainer = run(tmp_path, "lightning.trainer.limit_val_batches=1")
    assert trainer.global_step == 0 and trainer.state.fn == "validate"
    assert "val/loss" in trainer.callback_metrics
    with pytest.raises(SystemExit, match="without -t.*validation or test"):
        run(tmp_path / "b", drop=("data.params.validation",))
