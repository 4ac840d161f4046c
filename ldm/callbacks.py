"""Lightning callbacks of a training run: log dir, safe checkpoints, RNG state, guards, images."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchvision.utils import make_grid

from ldm.checkpoint import write_atomically

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it.

    A crash or a full disk mid-write leaves the previous file with that name intact.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

        write_atomically(path, write)


class SetupCallback(pl.Callback):
    """Creates `logdir/{checkpoints,configs}` and saves the merged config there at fit start."""

    def __init__(self, now: str, logdir: str, ckptdir: str, cfgdir: str, config, lightning_config):
        super().__init__()
        self.now, self.logdir, self.ckptdir, self.cfgdir = now, logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(folder, exist_ok=True)
        OmegaConf.save(self.config, os.path.join(self.cfgdir, f"{self.now}-project.yaml"))
        lightning = OmegaConf.create({"lightning": self.lightning_config})
        OmegaConf.save(lightning, os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))


class RNGStateCallback(pl.Callback):
    """Saves the Python, NumPy and torch RNG states in checkpoints and restores them on resume.

    States are stored as tensors and plain lists so `weights_only` loading accepts them.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(internal), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def parameters_are_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` is free of NaN and inf."""
    return all(torch.isfinite(p).all() for p in module.parameters())


class NonFiniteLossGuard(pl.Callback):
    """Stops the run at the first NaN or inf loss, before any checkpoint of that step is written.

    Lightning runs checkpoint callbacks after the others, so `last.ckpt` keeps the last good step.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"the training loss became {loss.item()} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {batch_idx}); stopping. The last "
                "checkpoint written before this step is intact: lower the learning rate, use "
                "bf16 instead of fp16, or check the data, then resume from it with -r."
            )


class SaveOnInterrupt(pl.Callback):
    """On Ctrl-C or SIGTERM, writes `last.ckpt` so that `-r` continues from here.

    Nothing is written if the weights have gone non-finite.
    """

    def __init__(self, ckptdir: str):
        super().__init__()
        self.ckptdir = ckptdir

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if not parameters_are_finite(pl_module):
            logger.warning("interrupted with non-finite weights: last.ckpt left as it was")
            return
        path = os.path.join(self.ckptdir, LAST_CHECKPOINT)
        trainer.save_checkpoint(path)
        logger.info("interrupted at step %d: saved %s", trainer.global_step, path)


class SkippedImagesReport(pl.Callback):
    """Totals the unreadable images the data sets skipped (`batch["skipped"]`) per epoch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        skipped = batch.get("skipped") if isinstance(batch, dict) else None
        if skipped is not None:
            self.count += int(torch.as_tensor(skipped).sum())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.count:
            logger.warning(
                "epoch %d: %d unreadable images were skipped (see the warnings naming them)",
                trainer.current_epoch, self.count,
            )  # fmt: skip
        self.count = 0


def to_uint8_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] as one (H', W', 3) uint8 grid."""
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=1)
    return ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


class ImageLogger(pl.Callback):
    """Every `batch_frequency` steps, saves the model's `log_images` as PNG grids.

    Grids go to `<logdir>/images/<split>/<name>_gs-<step>_e-<epoch>_b-<batch>.png` (the
    captions beside them in a .txt file), and to the TensorBoard or W&B logger when one is used.
    """

    def __init__(
        self, batch_frequency: int, max_images: int = 8, log_first_step: bool = False,
        log_images_kwargs: dict | None = None,
    ):  # fmt: skip
        super().__init__()
        self.batch_frequency, self.max_images = batch_frequency, max_images
        self.log_first_step = log_first_step
        self.log_images_kwargs = log_images_kwargs or {}

    def due(self, step: int) -> bool:
        return (step % self.batch_frequency == 0) and (step > 0 or self.log_first_step)

    @rank_zero_only
    def log_images(self, trainer, pl_module, batch, batch_idx: int, split: str) -> None:
        was_training = pl_module.training
        pl_module.eval()
        images = pl_module.log_images(batch, n=self.max_images, **self.log_images_kwargs)
        pl_module.train(was_training)
        captions = images.pop("captions", None)
        folder = Path(trainer.default_root_dir) / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"gs-{trainer.global_step:06}_e-{trainer.current_epoch:06}_b-{batch_idx:06}"
        for name, tensor in images.items():
            grid = to_uint8_grid(tensor, nrow=min(len(tensor), self.max_images))
            Image.fromarray(grid).save(folder / f"{name}_{stem}.png")
            log_image(trainer.logger, f"{split}/{name}", grid, trainer.global_step)
        if captions:
            (folder / f"captions_{stem}.txt").write_text("\n".join(captions) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.due(trainer.global_step) and hasattr(pl_module, "log_images"):
            self.log_images(trainer, pl_module, batch, batch_idx, "train")


def log_image(experiment_logger, tag: str, grid: np.ndarray, step: int) -> None:
    """Send a grid to TensorBoard or W&B; other loggers (CSV) only get the PNG files."""
    if isinstance(experiment_logger, TensorBoardLogger):
        experiment_logger.experiment.add_image(tag, grid, step, dataformats="HWC")
    elif isinstance(experiment_logger, WandbLogger):
        experiment_logger.log_image(key=tag, images=[grid], step=step)
