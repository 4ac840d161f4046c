"""A sampler whose order is a pure function of (seed, epoch), split across ranks, resumable.

Lightning resumes mid-epoch only with loaders that have `state_dict` / `load_state_dict`
(`ResumableLoader`); with them a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """Indices of one epoch for this rank: a permutation seeded by seed + epoch, or in order.

    Each rank takes every world_size-th index of the same order (the tail that does not divide
    evenly is dropped), so ranks never share an item. The sampler counts its own epochs (each
    `iter` is the next one) rather than taking Lightning's, which moves on when a run stops at
    `max_steps` mid-epoch; `resume(epoch, start)` makes the next `iter` continue an epoch.
    """

    def __init__(self, length: int, shuffle: bool, seed: int):
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.epoch, self.next_epoch, self.start = 0, 0, 0

    def resume(self, epoch: int, start: int) -> None:
        """Make the next iteration epoch `epoch`, skipping its first `start` items."""
        self.next_epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        """(length // world_size,) indices of `epoch` for this rank."""
        rank, world = rank_and_world_size()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        return order[: self.length // world * world][rank::world]

    def __iter__(self) -> Iterator[int]:
        self.epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        order, self.start = self.order(self.epoch)[self.start :], 0
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.length // rank_and_world_size()[1]


class ResumableLoader(DataLoader):
    """A DataLoader over a ResumableSampler that Lightning checkpoints and restores.

    `progress()` returns how many batches of the current epoch the training loop has taken;
    it is read from the trainer rather than counted here, because Lightning fetches one batch
    ahead of the step it is running.
    """

    def __init__(self, *args, progress: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "batches": self.progress()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampler.resume(state_dict["epoch"], state_dict["batches"] * self.batch_size)
