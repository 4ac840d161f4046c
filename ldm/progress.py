"""What a long run shows while it trains: a step bar in a terminal, a line every N steps in a
log file, and `<logdir>/loss.png`, the loss curves redrawn at each validation."""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from ldm.plots import line_plot

logger = logging.getLogger(__name__)

# The loss a line, the bar and the curve show: the first one a model logs (LatentDiffusion,
# AutoencoderKL, then any model that logs a plain `train/loss`).
TRAIN_LOSS_KEYS = ("train/loss_simple", "train/rec_loss", "train/loss")
# The validation losses the curve draws, each one the model logs.
VAL_LOSS_KEYS = ("val/loss_simple", "val/loss_simple_ema", "val/rec_loss")
LINES_PER_RUN = 40  # ProgressLog's default: about this many lines over the run's steps
LOSS_PLOT = "loss.png"


def train_loss(metrics: Mapping[str, Any]) -> tuple[str, torch.Tensor | float] | None:
    """(name, value) of the training loss among a trainer's `callback_metrics`, or None."""
    for key in TRAIN_LOSS_KEYS:
        if key in metrics:
            return key, metrics[key]
    return None


class Mean:
    """A running mean of scalars kept on their device: read (one GPU sync) only when popped."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value: torch.Tensor | float) -> None:
        self.total = self.total + (value.detach() if torch.is_tensor(value) else value)
        self.count += 1

    def pop(self) -> float | None:
        """The mean since the last pop (None if nothing was added), then start again."""
        mean = float(self.total) / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


def total_steps(trainer: pl.Trainer) -> int | None:
    """The optimizer steps the fit will take (max_steps, or epochs × batches), None if unknown."""
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) and total > 0 else None


def nice_interval(total: int | None, lines: int = LINES_PER_RUN) -> int:
    """1, 2 or 5 × 10^k steps: about `lines` lines over `total` steps (100 when unknown)."""
    if total is None:
        return 100
    raw = max(total / lines, 1)
    base = 10 ** math.floor(math.log10(raw))
    return int(next(m * base for m in (1, 2, 5, 10) if m * base >= raw))


def clock(seconds: float) -> str:
    """H:MM:SS."""
    return str(datetime.timedelta(seconds=round(seconds)))


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps towards the run's total (`max_steps`)
    across epochs rather than batches of one epoch, so that its rate and ETA are the run's.
    The postfix shows the epoch and the training loss; every logged metric is in the logger's
    files (`csv/version_*/metrics.csv` by default)."""

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=total_steps(trainer))
        self.train_progress_bar.initial = trainer.global_step  # a resumed run starts there
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("Training")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: nothing to reset per epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or step == bar.n:
            return  # gradient accumulation: no optimizer step yet
        if self._should_update(step, bar.total) or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the postfix is set per step; the bar stays open across epochs

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        loss = train_loss(trainer.callback_metrics)
        metrics = {"epoch": trainer.current_epoch}
        return metrics if loss is None else {**metrics, "loss": f"{float(loss[1]):.4g}"}


class ProgressLog(pl.Callback):
    """Logs one line every `every_n_steps` optimizer steps (and at the end) when the run shows
    no progress bar, i.e. when its output goes to a file or `lightning.trainer.
    enable_progress_bar` is false (main.py then adds no bar, in a terminal too):

        step 120/3500 (3%) loss 0.1234 2.9 it/s elapsed 0:00:41 eta 0:19:25

    The loss is the mean training loss (`TRAIN_LOSS_KEYS`) over the steps since the last line;
    it/s, elapsed and eta are of this process's wall time (validation included) since training
    started, so a resumed run measures from its resume. Rank 0 only.

    Args:
        every_n_steps: steps between lines; None: about LINES_PER_RUN lines over the run.
    """

    def __init__(self, every_n_steps: int | None = None):
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"ProgressLog: every_n_steps must be ≥ 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.active, self.interval, self.total = False, 1, None
        self.start_time, self.start_step, self.last_step = 0.0, 0, 0
        self.loss = Mean()  # since the last line

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = trainer.is_global_zero and trainer.progress_bar_callback is None
        self.total = total_steps(trainer)
        self.interval = self.every_n_steps or nice_interval(self.total)
        self.start_time, self.start_step = time.monotonic(), trainer.global_step
        self.last_step, self.loss = trainer.global_step, Mean()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.active:
            return
        loss = train_loss(trainer.callback_metrics)
        if loss is not None:
            self.loss.add(loss[1])
        step = trainer.global_step
        if step != self.last_step and step % self.interval == 0:
            self.log_line(step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and trainer.global_step != self.last_step:
            self.log_line(trainer.global_step)

    def log_line(self, step: int) -> None:
        """Log `step`'s line, then start the next window of losses."""
        elapsed = time.monotonic() - self.start_time
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        parts = [f"step {step}"]
        if self.total:
            parts = [f"step {step}/{self.total} ({100 * step // self.total}%)"]
        loss = self.loss.pop()
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        parts.append(f"{rate:.3g} it/s elapsed {clock(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"eta {clock(max(self.total - step, 0) / rate)}")
        logger.info(" ".join(parts))
        self.last_step = step


class LossCurve(pl.Callback):
    """Draws `<logdir>/loss.png` (`trainer.default_root_dir`): the training loss, averaged over
    each `log_every_n_steps` window, and each validation loss (`VAL_LOSS_KEYS`) against the
    global step; redrawn at each validation and at the end of training, by rank 0.

    The points are in the callback's checkpoint state, so a resumed run continues the curve.
    """

    def __init__(self):
        super().__init__()
        self.points: dict[str, list[list[float]]] = {}  # name: [steps, values]
        self.train_key = TRAIN_LOSS_KEYS[0]  # the one the model logs, set at its first step
        self.window = Mean()  # training losses since the last point
        self.window_step = 0

    def add(self, name: str, step: int, value: float) -> None:
        steps, values = self.points.setdefault(name, [[], []])
        steps.append(step)
        values.append(value)

    def flush(self, step: int) -> None:
        """Add the mean training loss of the window that ends at `step`."""
        mean = self.window.pop()
        if mean is not None and step > self.window_step:
            self.add(self.train_key, step, mean)
        self.window_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = train_loss(trainer.callback_metrics)
        if loss is None:
            return
        self.train_key = loss[0]
        self.window.add(loss[1])
        step = trainer.global_step
        if step > self.window_step and step % max(trainer.log_every_n_steps, 1) == 0:
            self.flush(step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.flush(trainer.global_step)
        for key in VAL_LOSS_KEYS:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.add(key, trainer.global_step, float(value))
        self.draw(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush(trainer.global_step)
        self.draw(trainer)

    def draw(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or not self.points:
            return
        path = Path(trainer.default_root_dir) / LOSS_PLOT
        path.parent.mkdir(parents=True, exist_ok=True)
        series = {name: (steps, values) for name, (steps, values) in self.points.items()}
        line_plot(series, path, title=f"loss ({path.parent.name})", ylabel="loss")

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = {k: [list(s), list(v)] for k, (s, v) in state_dict["points"].items()}
        self.window_step = max((max(s, default=0) for s, _ in self.points.values()), default=0)
