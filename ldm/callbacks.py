"""Lightning callbacks of a training run: log dir, safe checkpoints, RNG state, guards, images."""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchvision.utils import make_grid

from ldm.checkpoint import LAST_CHECKPOINT, config_names, load_torch_file, write_atomically
from ldm.data.sampler import derive_seed
from ldm.strategies import refuse_rank_zero_sampling

logger = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it.

    A crash or a full disk mid-write leaves the previous file with that name intact. Reading
    (`trainer.fit(ckpt_path=..., weights_only=...)`) names a truncated, corrupt or pickled file.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

        write_atomically(path, write)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None):
        # Lightning passes weights_only=None when not told: load weights only, as torch does.
        return load_torch_file(path, unsafe_pickle=weights_only is False, map_location=map_location)


class SetupCallback(pl.Callback):
    """Creates `logdir/{checkpoints,configs}` and saves the merged config there at fit start."""

    def __init__(self, now: str, logdir: str, ckptdir: str, cfgdir: str, config, lightning_config):
        super().__init__()
        self.now, self.logdir, self.ckptdir, self.cfgdir = now, logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Processes that torchrun or srun start on other nodes named a new run's log dir by
        # their own clock: all take rank 0's (which alone writes it), as trainer.log_dir does.
        logdir = trainer.strategy.broadcast(self.logdir)
        if logdir != self.logdir:
            self.logdir, self.ckptdir = logdir, os.path.join(logdir, os.path.basename(self.ckptdir))
            trainer._default_root_dir = logdir  # Lightning has no public setter

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(folder, exist_ok=True)
        project, lightning_name = config_names(self.now)
        OmegaConf.save(self.config, os.path.join(self.cfgdir, project))
        lightning = OmegaConf.create({"lightning": self.lightning_config})
        OmegaConf.save(lightning, os.path.join(self.cfgdir, lightning_name))


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as tensors and plain lists so
    that `weights_only` loading accepts them."""
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the CPU's and every CUDA device's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """`obj` from every rank, in rank order (a collective: every rank must call it)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


class RNGStateCallback(pl.Callback):
    """Gives each DDP rank its own RNG stream, and checkpoints every rank's so that a resume
    continues each of them.

    At fit start each rank seeds Python, NumPy and torch from (seed, global rank), so ranks
    draw different timesteps, noise and caption dropout for their different images. The data
    order and item augmentation (`ResumableSampler`, `SeededItems`) and the initial weights
    (built before the fit; DDP also broadcasts rank 0's) do not come from these streams and
    stay the same on every rank. Lightning keeps the callback state of rank 0 only, so the
    states of all ranks are gathered into it as `ranks`; on resume each rank takes its own.

    Args:
        seed: the run's seed; default: the one torch was last seeded with (main.py seeds it).
    """

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = torch.initial_seed() if seed is None else seed
        self.rank, self.world_size = 0, 1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        if stage == "fit":  # before a checkpoint is restored, which then overrides this
            seed_rngs(derive_seed(self.seed, self.rank))

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is saved (all ranks take part in saving).
        return {"seed": self.seed, "ranks": gather_objects(rng_state(), self.world_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks", [state_dict])  # older checkpoints: one process's state
        if self.rank < len(ranks):
            set_rng_state(ranks[self.rank])
        else:
            logger.warning(
                "the checkpoint holds the RNG states of %d ranks: rank %d keeps a fresh stream "
                "(seeded from the seed and its rank), so this resume is not exact",
                len(ranks),
                self.rank,
            )
        if len(ranks) != self.world_size and self.rank == 0:
            logger.warning(
                "resuming %d ranks from a checkpoint of %d: the data is split differently "
                "and the resume is not exact",
                self.world_size,
                len(ranks),
            )


def parameters_are_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` is free of NaN and inf."""
    return all(torch.isfinite(p).all() for p in module.parameters())


class NonFiniteLossGuard(pl.Callback):
    """Stops the run at the first NaN or inf loss on any rank, before any checkpoint of that
    step is written.

    Lightning runs checkpoint callbacks after the others, so `last.ckpt` keeps the last good
    step. Under DDP the ranks' losses are gathered every step (one scalar each), so that all
    ranks stop at the same step with the same message, rather than the healthy ones waiting in
    the next collective for a rank that has stopped.
    """

    def __init__(self):
        super().__init__()
        self.step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.step = trainer.global_step  # the step this batch is for (Lightning counts it after)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # a rank without a loss still takes part in the gather, as a finite one
        loss = torch.zeros((), device=pl_module.device) if loss is None else loss.detach()
        losses = trainer.strategy.all_gather(loss.float().mean()).reshape(-1)  # (world_size,)
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if not bad:
            return
        where = ""
        if len(losses) > 1:
            ranks = ", ".join(str(r) for r in bad)
            where = f" on rank{'s' if len(bad) > 1 else ''} {ranks} of {len(losses)}"
        values = ", ".join(str(losses[r].item()) for r in bad)
        raise FloatingPointError(
            f"the training loss became {values}{where} at global step {self.step} "
            f"(epoch {trainer.current_epoch}, batch {batch_idx}); stopping. The last "
            "checkpoint written before this step is intact: lower the learning rate, use "
            "bf16 instead of fp16, or check the data, then resume from it with -r."
        )


class SaveOnInterrupt(pl.Callback):
    """On Ctrl-C or SIGTERM, writes `last.ckpt` so that `-r` continues from here; on SLURM
    with auto-requeue, runs Lightning's requeue at the end of a step.

    Lightning's SIGUSR1 handler saves `hpc_ckpt_<N>.ckpt` and calls `scontrol requeue` where
    the signal lands: mid-step, it saves the weights of one step with the RNG states and data
    position of the next, and under DDP it enters the checkpoint's collectives while another
    rank is in a gradient all-reduce. Here the signal only marks the requeue as due, and at
    the end of the step in which any rank got it (the ranks agree on that each step) every
    rank runs Lightning's handler, so the file is a step checkpoint like the others. The
    SIGTERM that SLURM then sends writes no second copy of that step. Nothing is written if
    the weights have gone non-finite.
    """

    def __init__(self, ckptdir: str):
        super().__init__()
        self.ckptdir = ckptdir
        self.requeue, self.signum = None, None  # Lightning's requeue handler and its signal
        self.requeue_due = False
        self.step = 0  # the global step at the last batch end
        self.requeued_step = -1  # the global step the requeue checkpoint holds

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step
        environment = trainer._accelerator_connector.cluster_environment
        handler = getattr(trainer._signal_connector, "_slurm_sigusr_handler_fn", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and handler:
            self.requeue, self.signum = handler, environment.requeue_signal
            signal.signal(self.signum, self.mark_requeue_due)  # Lightning restores it at the end

    def mark_requeue_due(self, signum: int, frame) -> None:
        self.requeue_due = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped, self.step = trainer.global_step != self.step, trainer.global_step
        if self.requeue is None or not stepped:  # not between accumulated batches
            return
        if trainer.strategy.reduce_boolean_decision(self.requeue_due, all=False):
            self.requeue_due, self.requeued_step = False, trainer.global_step
            self.requeue(self.signum, None)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if not parameters_are_finite(pl_module):
            logger.warning("interrupted with non-finite weights: last.ckpt left as it was")
            return
        if trainer.global_step == self.requeued_step:
            logger.info("interrupted at step %d: saved for the requeue already", self.requeued_step)
            return
        path = os.path.join(self.ckptdir, LAST_CHECKPOINT)
        trainer.save_checkpoint(path)
        logger.info("interrupted at step %d: saved %s", trainer.global_step, path)


# Per-item counts the data sets put in their items, and what a nonzero total means.
DATA_COUNTS = {
    "skipped": "unreadable images were skipped (see the warnings naming them)",
    "empty_caption": "items had an empty caption (after tag dropout, if any): trained as "
    "unconditional",
}


class DataReport(pl.Callback):
    """Totals per epoch what the data sets counted in their items (`DATA_COUNTS`): unreadable
    images skipped, empty captions; summed over this rank's workers."""

    def __init__(self):
        super().__init__()
        self.counts = dict.fromkeys(DATA_COUNTS, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        for key in DATA_COUNTS:
            value = batch.get(key) if isinstance(batch, dict) else None
            if value is not None:
                self.counts[key] += int(torch.as_tensor(value).sum())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for key, meaning in DATA_COUNTS.items():
            if self.counts[key]:
                log = logger.warning if key == "skipped" else logger.info
                log("epoch %d: %d %s", trainer.current_epoch, self.counts[key], meaning)
        self.counts = dict.fromkeys(DATA_COUNTS, 0)


def to_uint8_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] as one (H', W', 3) uint8 grid."""
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=1)
    return ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


class ImageLogger(pl.Callback):
    """Every `batch_frequency` steps, saves the model's `log_images` as PNG grids.

    Grids go to `<logdir>/images/<split>/<name>_gs-<step>_e-<epoch>_b-<batch>.png` (the
    captions beside them in a .txt file), and to the TensorBoard or W&B logger when one is used.
    Rank 0 samples alone, which a sharded strategy (FSDP, DeepSpeed) cannot do: refused there.
    """

    def __init__(
        self,
        batch_frequency: int,
        max_images: int = 8,
        log_first_step: bool = False,
        log_images_kwargs: dict | None = None,
    ):
        super().__init__()
        self.batch_frequency, self.max_images = batch_frequency, max_images
        self.log_first_step = log_first_step
        self.log_images_kwargs = log_images_kwargs or {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            leave_out = "set lightning.callbacks.image_logger=null (or its name there), or "
            refuse_rank_zero_sampling(trainer.strategy, "ImageLogger", leave_out)

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
