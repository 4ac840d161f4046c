"""What a run shows as it trains: the step bar, the progress lines, loss.png and the plots."""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

import main
from ldm import plots
from ldm.progress import LossCurve, ProgressLog, StepProgressBar, nice_interval

SMALL = [
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.trainer.limit_val_batches=1",
    "lightning.trainer.val_check_interval=2",
    "lightning.trainer.log_every_n_steps=1",
]
LINE = re.compile(
    r"step (\d+)/(\d+) \((\d+)%\) loss [\d.e+-]+ [\d.e+-]+ it/s elapsed \d+:\d\d:\d\d "
    r"eta \d+:\d\d:\d\d"
)


def train(tmp_path: Path, *args: str):
    argv = ["--base", str(ROOT / "configs/tiny/txt2img.yaml"), "-t", "--no-test"]
    return main.main([*argv, "-l", str(tmp_path / "logs"), *SMALL, *args])


def callback(trainer, kind: type):
    (found,) = [c for c in trainer.callbacks if isinstance(c, kind)]
    return found


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ldm.progress"]


def test_the_bar_is_on_only_in_a_terminal_and_the_config_can_turn_it_off(monkeypatch):
    opt = argparse.Namespace(**dict.fromkeys(main.TRAINER_FLAGS))
    for tty in (True, False):
        monkeypatch.setattr(main, "interactive", lambda tty=tty: tty)
        assert main.trainer_kwargs(opt, main.OmegaConf.create())["enable_progress_bar"] is tty
    off = main.OmegaConf.create({"trainer": {"enable_progress_bar": False}})
    assert main.trainer_kwargs(opt, off)["enable_progress_bar"] is False


def test_lines_every_n_steps_fit_a_few_minute_run():
    assert [nice_interval(n) for n in (3500, 1000, 40, 10, None)] == [100, 50, 1, 1, 100]
    with pytest.raises(ValueError, match="every_n_steps"):
        ProgressLog(every_n_steps=0)


@pytest.mark.slow
def test_a_run_piped_to_a_file_logs_lines_and_draws_loss_png(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(main, "interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="ldm.progress"):
        trainer = train(
            tmp_path, "--max_steps", "4", "lightning.callbacks.progress_log.params.every_n_steps=2"
        )
    assert trainer.progress_bar_callback is None
    lines = progress_lines(caplog)
    assert [LINE.fullmatch(line).groups() for line in lines] == [
        ("2", "4", "50"),
        ("4", "4", "100"),
    ], lines
    png = Path(trainer.default_root_dir) / "loss.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == plots.SIZE
        pixels = np.asarray(image.convert("RGB")).astype(int)
    left, top, _, bottom = plots.MARGINS
    plot_area = pixels[top : plots.SIZE[1] - bottom, left : plots.SIZE[0] // 2 + 150]  # no legend
    for color in plots.COLORS[:2]:  # the training curve, then val/loss_simple
        near = np.abs(plot_area - np.array(color)).sum(-1) < 40
        assert near.sum() > 50, f"no curve drawn in {color}"


@pytest.mark.slow
def test_in_a_terminal_a_bar_counts_steps_to_max_steps_and_no_lines_are_logged(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(main, "interactive", lambda: True)
    with caplog.at_level(logging.INFO, logger="ldm.progress"):
        trainer = train(tmp_path, "--max_steps", "3")
    bar = trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)
    assert progress_lines(caplog) == []


@pytest.mark.slow
def test_a_disabled_bar_in_a_terminal_leaves_the_lines_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(main, "interactive", lambda: True)
    with caplog.at_level(logging.INFO, logger="ldm.progress"):
        trainer = train(tmp_path, "--max_steps", "2", "lightning.trainer.enable_progress_bar=false")
    assert trainer.progress_bar_callback is None
    assert [LINE.fullmatch(line).group(1) for line in progress_lines(caplog)] == ["1", "2"]


@pytest.mark.slow
def test_a_resumed_run_continues_the_loss_curve(tmp_path, monkeypatch):
    monkeypatch.setattr(main, "interactive", lambda: False)
    first = train(tmp_path, "--max_steps", "2")
    resumed = main.main(["-r", first.default_root_dir, "-t", "--no-test", "--max_steps", "4"])
    points = callback(resumed, LossCurve).points
    assert points["train/loss_simple"][0] == [1, 2, 3, 4]
    assert points["val/loss_simple"][0] == [2, 4] == points["val/loss_simple_ema"][0]


def test_default_callbacks_take_overrides_and_can_be_left_out(tmp_path):
    lightning = main.OmegaConf.create(
        {"callbacks": {"loss_curve": None, "progress_log": {"params": {"every_n_steps": 7}}}}
    )
    config = main.OmegaConf.create({"data": {}})
    callbacks = main.make_callbacks("now", str(tmp_path), config, lightning, None, bar=False)
    assert not any(isinstance(c, LossCurve | StepProgressBar) for c in callbacks)
    assert [c.every_n_steps for c in callbacks if isinstance(c, ProgressLog)] == [7]


def test_line_plot_survives_a_single_point_nans_and_no_data(tmp_path):
    series = {"one": ([3], [0.5]), "nan": ([1, 2, 3], [math.nan, 1.0, math.inf]), "none": ([], [])}
    plots.line_plot(series, tmp_path / "a.png", title="t", ylabel="y")
    plots.line_plot({}, tmp_path / "empty.png")
    plots.line_plot({"zero": ([1, 2], [0.0, 1.0])}, tmp_path / "log.png", log_y=True)
    for name in ("a.png", "empty.png", "log.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == plots.SIZE
    with pytest.raises(ValueError, match="positive"):
        plots.line_plot(series, tmp_path / "bad.png", log_y=True, y_range=(0, 1))


def test_log_axis_is_chosen_for_losses_spanning_a_decade_and_ticks_are_round():
    assert plots.wants_log({"loss": ([1, 2], [1.0, 0.05])})
    assert not plots.wants_log({"loss": ([1, 2], [1.0, 0.5])})
    assert not plots.wants_log({"acc": ([1, 2], [0.0, 1.0])})
    assert plots.linear_ticks(0, 3500) == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert [round(10**t, 6) for t in plots.log_ticks(-1.2, 0.1)] == [0.1, 0.2, 0.5, 1.0]
    assert [plots.tick_label(v) for v in (1500, 20000, 0.25, 1e-4)] == [
        "1500",
        "20k",
        "0.25",
        "1e-04",
    ]
