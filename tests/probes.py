"""Callbacks that tests put into a main.py run through `lightning.callbacks` (also under DDP).

They import as `probes.<Name>` with `tests/` on the path, which pytest puts there in-process and
the DDP tests put in the subprocess's PYTHONPATH.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch


def weights_checksum(module: torch.nn.Module) -> float:
    """A number that changes with any trainable weight (equal weights give equal sums)."""
    return sum(float(p.detach().double().abs().sum()) for p in module.parameters())


class RNGProbe(pl.Callback):
    """Records, per step, the first numbers this rank's torch RNG would draw next (without
    drawing them), the weights' checksum as built, at train start and at the end, and the
    rank's log dir, into `<dir>/probe-rank<r>-from<step>.json`."""

    def __init__(self, dir: str):
        super().__init__()
        self.dir = Path(dir)
        self.peeks: dict[int, list[float]] = {}
        self.checksums: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.checksums["built"] = weights_checksum(pl_module)  # before DDP broadcasts rank 0's

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.global_step
        self.checksums["start"] = weights_checksum(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        with torch.random.fork_rng(devices=[]):
            self.peeks[trainer.global_step] = torch.randn(4).tolist()

    def on_train_end(self, trainer, pl_module) -> None:
        self.checksums["end"] = weights_checksum(pl_module)
        name = f"probe-rank{trainer.global_rank}-from{self.start}.json"
        record = {"peeks": self.peeks, "checksums": self.checksums}
        record["logdir"] = str(trainer.default_root_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / name).write_text(json.dumps(record))


class NaNBatch(pl.Callback):
    """Turns the images of one rank's batch at one global step into NaN (a corrupt data item)."""

    def __init__(self, step: int, rank: int = 0, key: str = "image"):
        super().__init__()
        self.step, self.rank, self.key = step, rank, key

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch[self.key].fill_(float("nan"))
