"""The Lightning DataModule that the original main.py builds from the config's `data:` section.

Each split (train / validation / test / predict) is a `{target, params}` data set config. Only
the splits that are configured get a `*_dataloader` method, so Lightning skips the others.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.buckets import BucketBatchSampler, bucket_summary, item_sizes, merge_small_buckets
from ldm.data.sampler import (
    ResumableLoader,
    ResumableSampler,
    SeededItems,
    derive_seed,
    rank_and_world_size,
)
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "predict")
HOOKS = {"train": "train", "validation": "val", "test": "test", "predict": "predict"}


def cpu_count() -> int:
    """CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy and `random` from torch's per-worker seed, so workers draw different numbers."""
    seed = torch.initial_seed() % 2**32  # torch seeds each worker with base_seed + worker_id
    np.random.seed(seed)
    random.seed(seed)


def describe(dataset: Any) -> str:
    """Class name and, for map-style data sets, the item count."""
    size = "streamed" if isinstance(dataset, IterableDataset) else f"{len(dataset)} items"
    return f"{type(dataset).__name__} ({size})"


class WrappedDataset(Dataset):
    """A torch Dataset around any object with `__len__` and `__getitem__` (the original `wrap`)."""

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]


class DataModuleFromConfig(pl.LightningDataModule):
    """Data sets from `{target, params}` configs, served by DataLoaders of `batch_size`.

    The train loader shuffles map-style data and drops the last partial batch, so that every
    step sees `batch_size` items (a different remainder is left out each epoch). Iterable data
    sets are never shuffled by the loader; they shuffle themselves. Map-style data is split
    across DDP ranks by `ResumableSampler` (so the Trainer runs with
    `use_distributed_sampler=False`), in an order that depends only on the seed and the epoch,
    and the train loader resumes mid-epoch where a checkpoint left it. Each map-style item is
    produced with the RNGs seeded from (seed, epoch, index) (`SeededItems`), so random crops
    and flips are the same with any `num_workers` and after a resume. A streamed (iterable)
    data set cannot skip ahead: resuming mid-epoch restarts it, and a warning says so.

    Args:
        wrap: wrap each data set in `WrappedDataset`, as the original did for plain sequences.
        num_workers: loader processes; default `batch_size * 2`, capped at the CPU count.
        use_worker_init_fn: seed numpy and `random` per worker (`worker_init_fn`).
    """

    def __init__(
        self,
        batch_size: int,
        train: Mapping | None = None,
        validation: Mapping | None = None,
        test: Mapping | None = None,
        predict: Mapping | None = None,
        wrap: bool = False,
        num_workers: int | None = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"DataModuleFromConfig: 'batch_size' must be ≥ 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = min(batch_size * 2, cpu_count()) if num_workers is None else num_workers
        self.wrap = wrap
        self.use_worker_init_fn = use_worker_init_fn
        self.shuffle = {"validation": shuffle_val_dataloader, "test": shuffle_test_loader}
        # Data order and item randomness from the run's seed (main.py has just seeded torch with
        # it), the same on every rank; not from the global RNG stream, which is per rank.
        self.seed = torch.initial_seed() % 2**31
        configs = dict(zip(SPLITS, (train, validation, test, predict), strict=True))
        self.dataset_configs = {split: c for split, c in configs.items() if c is not None}
        self.datasets: dict[str, Any] = {}
        # Lightning runs a loop only when its *_dataloader hook is overridden: add configured ones
        # (a partial of a bound method, so the module still pickles for ddp_spawn).
        for split in self.dataset_configs:
            setattr(self, f"{HOOKS[split]}_dataloader", functools.partial(self.dataloader, split))

    def setup(self, stage: str | None = None) -> None:
        """Build every configured data set (once)."""
        for split, config in self.dataset_configs.items():
            if split not in self.datasets:
                dataset = instantiate_from_config(config)
                if split == "train":
                    self.merge_small_buckets(dataset)
                self.datasets[split] = WrappedDataset(dataset) if self.wrap else dataset
                logger.info("%s data: %s", split, describe(dataset))
        train = self.datasets.get("train")
        if train is not None and not isinstance(train, IterableDataset):
            if len(train) < self.batch_size:
                raise ValueError(
                    f"data.params.train has {len(train)} items, fewer than batch_size "
                    f"{self.batch_size}: the train loader drops partial batches, so none is left"
                )

    def merge_small_buckets(self, dataset: Any) -> None:
        """Merge the buckets too small to fill a batch into their neighbours."""
        sizes = item_sizes(dataset)
        if sizes is not None:
            dataset.merge_buckets(merge_small_buckets(sizes, self.batch_size))
            logger.info("train buckets: %s", bucket_summary(item_sizes(dataset)))

    def dataloader(self, split: str) -> DataLoader:
        """The DataLoader of one configured split."""
        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        # workers' base seeds: different per rank, so streamed data augments independently
        worker_seed = derive_seed(self.seed, rank_and_world_size()[0])
        common = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            worker_init_fn=worker_init_fn if self.use_worker_init_fn else None,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(worker_seed),
        )
        if isinstance(dataset, IterableDataset):
            if split == "train":
                self.warn_if_resuming_mid_epoch(dataset)
            if getattr(dataset, "spec", None) is not None:  # bucketed: it batches by bucket
                dataset.batch_by_bucket(self.batch_size)
                common["batch_size"] = None
            return DataLoader(dataset, **common)
        shuffle = split == "train" or self.shuffle.get(split, False)
        sizes = item_sizes(dataset)
        dataset = SeededItems(dataset, self.seed)
        if sizes is not None:  # one bucket a batch
            common.pop("batch_size")
            batches = BucketBatchSampler(
                sizes, self.batch_size, self.seed, shuffle, drop_last=split == "train"
            )
            if split != "train":
                return DataLoader(dataset, batch_sampler=batches, **common)
            return ResumableLoader(
                dataset, batch_sampler=batches, progress=self.batches_taken, **common
            )
        sampler = ResumableSampler(len(dataset), shuffle, self.seed, keyed=True)
        if split != "train":
            return DataLoader(dataset, sampler=sampler, **common)
        return ResumableLoader(
            dataset, sampler=sampler, drop_last=True, progress=self.batches_taken, **common
        )

    def warn_if_resuming_mid_epoch(self, dataset: IterableDataset) -> None:
        """Say that a streamed data set restarts, repeating the part of the epoch already done."""
        trainer = self.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress if trainer is not None else None
        if progress is None or progress.is_last_batch or not self.batches_taken():
            return
        if trainer.global_rank == 0:
            logger.warning(
                "resuming mid-epoch on %s, a streamed data set that cannot skip ahead: it "
                "restarts from the beginning of its first pass (its shuffles too), so its first "
                "%d batches (%d items per rank) are trained on again in epoch %d",
                describe(dataset),
                self.batches_taken(),
                self.batches_taken() * self.batch_size,
                trainer.current_epoch,
            )

    def batches_taken(self) -> int:
        """Batches of the current epoch the training loop has processed (0 outside a fit)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed
