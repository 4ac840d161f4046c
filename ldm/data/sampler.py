"""A sampler whose order is a pure function of (seed, epoch), split across ranks, resumable,
and items whose randomness is a pure function of (seed, epoch, index).

Lightning resumes mid-epoch only with loaders that have `state_dict` / `load_state_dict`
(`ResumableLoader`); with them a resumed run sees the same batches as an uninterrupted one.
With `SeededItems` those batches also hold the same random crops and flips, whichever
DataLoader worker (or the main process) produces them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that is a pure function of non-negative `parts` (e.g. seed, epoch, index);
    NumPy's SeedSequence hashes them, so neighbouring tuples give unrelated streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded with `seed` inside the block, and put
    back as they were after it (CUDA generators are not touched: data loading runs on the CPU)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededItems(Dataset):
    """A map-style data set read by `(epoch, index)` keys (`ResumableSampler(keyed=True)`).

    Item `index` of `epoch` is produced with Python's, NumPy's and torch's RNGs seeded from
    (seed, epoch, index), so random augmentation drawn from them (`ImageTransform`, torchvision
    transforms, `random`, `np.random`) differs per epoch but not per worker, process or resume.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded_rngs(derive_seed(self.seed, epoch, index)):
            return self.dataset[index]


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
    With `keyed` it yields `(epoch, index)` pairs, the keys of `SeededItems`.
    """

    def __init__(self, length: int, shuffle: bool, seed: int, keyed: bool = False):
        self.length, self.shuffle, self.seed, self.keyed = length, shuffle, seed, keyed
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

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        self.epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        order, self.start = self.order(self.epoch)[self.start :].tolist(), 0
        return iter([(self.epoch, i) for i in order] if self.keyed else order)

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

    @property
    def resumable(self) -> Any:
        """What keeps the epoch: the batch sampler when it resumes itself (buckets), else the
        sampler."""
        return self.batch_sampler if hasattr(self.batch_sampler, "resume") else self.sampler

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.resumable.epoch, "batches": self.progress()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, batches = state_dict["epoch"], state_dict["batches"]
        if self.resumable is self.sampler:
            self.sampler.resume(epoch, batches * self.batch_size)
        else:
            self.batch_sampler.resume(epoch, batches)
