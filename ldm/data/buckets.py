"""Aspect-ratio buckets: images trained at about the same pixel area in their own shape.

    train:
      target: ldm.data.folder.ImageCaptionFolder
      params:
        root: data/photos
        buckets: {resolution: 512, step: 64, min_side: 256, max_side: 1024, max_ratio: 2.0}

`BucketSpec.sizes` lists (width, height) pairs whose sides are multiples of `step` (64 = 8 x
the SD autoencoder's factor 8, so the UNet's three downsamplings of the latent divide evenly),
with an area of at most resolution² and more than resolution² - step · max_side (the most the
rounding down of one side can take off), sides in [min_side, max_side] and a long-to-short side
ratio of at most max_ratio. Each image goes to the bucket nearest its aspect ratio (in log
ratio, so 2:1 and 1:2 are as far from square), is resized to cover it and cropped to exactly
its size. A batch holds one bucket (`BucketBatchSampler`).

A bucket with fewer items than the batch size could never fill a batch: `merge_small_buckets`
moves its items into the nearest bucket (by ratio) that has enough, and logs how many moved.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Sampler

from ldm.data.sampler import rank_and_world_size
from ldm.data.transform import Size
from ldm.util import ConfigError, to_plain

logger = logging.getLogger(__name__)

# EXIF orientations that rotate by 90 degrees: the stored width is the shown height.
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112


def log_ratio(size: Size) -> float:
    return math.log(size[0] / size[1])


@dataclass(frozen=True)
class BucketSpec:
    """The bucket set: about `resolution`² pixels each, sides multiples of `step`."""

    resolution: int = 512
    step: int = 64
    min_side: int = 256
    max_side: int = 1024
    max_ratio: float = 2.0

    def __post_init__(self) -> None:
        where = "buckets"
        for name in ("resolution", "step", "min_side", "max_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{name}: expected pixels (an int ≥ 1), got {value!r}")
        for name in ("resolution", "min_side", "max_side"):
            if getattr(self, name) % self.step:
                raise ConfigError(
                    f"{where}.{name} {getattr(self, name)} is not a multiple of step {self.step}"
                )
        if not self.min_side <= self.resolution <= self.max_side:
            raise ConfigError(
                f"{where}: expected min_side ≤ resolution ≤ max_side, got {self.min_side}, "
                f"{self.resolution}, {self.max_side}"
            )
        if not isinstance(self.max_ratio, int | float) or self.max_ratio < 1:
            raise ConfigError(f"{where}.max_ratio: expected a number ≥ 1, got {self.max_ratio!r}")

    @classmethod
    def parse(cls, config: Mapping | None) -> BucketSpec | None:
        """A spec from a data set's `buckets:` mapping (None: square crops, no buckets)."""
        if config is None:
            return None
        config = to_plain(config)
        fields = set(cls.__dataclass_fields__)
        if not isinstance(config, Mapping) or set(config) - fields:
            unknown = sorted(set(config) - fields) if isinstance(config, Mapping) else config
            raise ConfigError(f"buckets: unknown keys {unknown}; expected some of {sorted(fields)}")
        return cls(**config)

    @functools.cached_property
    def sizes(self) -> list[Size]:
        """The buckets, (width, height), from the widest to the tallest."""
        area, found = self.resolution**2, set()
        for width in range(self.min_side, self.max_side + 1, self.step):
            height = area // width // self.step * self.step
            if self.min_side <= height <= self.max_side:
                if max(width, height) / min(width, height) <= self.max_ratio:
                    found |= {(width, height), (height, width)}
        return sorted(found, key=log_ratio, reverse=True)

    def nearest(self, size: Size) -> Size:
        """The bucket whose aspect ratio is nearest that of an image of `size`."""
        target = log_ratio(size)
        return min(self.sizes, key=lambda bucket: abs(log_ratio(bucket) - target))


def image_size(path: str | Path) -> Size:
    """(width, height) of an image file as shown, after its EXIF orientation; reads the header."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return (height, width) if orientation in TRANSPOSING_ORIENTATIONS else (width, height)


def cover_scale(size: Size, bucket: Size) -> float:
    """The factor that resizes an image of `size` to cover `bucket` (> 1: it is upscaled)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def merge_small_buckets(sizes: Sequence[Size], minimum: int) -> dict[Size, Size]:
    """{small bucket: bucket it merges into} for the buckets of `sizes` (one per item) with
    fewer than `minimum` items; each goes to the nearest bucket (by ratio) that has enough."""
    counts = Counter(sizes)
    large = [bucket for bucket, n in counts.items() if n >= minimum]
    if not large:
        # no bucket fills a batch alone: everything goes to the most common one
        large = [max(counts, key=lambda bucket: (counts[bucket], bucket))]
    merged = {}
    for bucket, n in counts.items():
        if n < minimum and bucket not in large:
            merged[bucket] = min(large, key=lambda b: (abs(log_ratio(b) - log_ratio(bucket)), b))
    if merged:
        moved = sum(counts[bucket] for bucket in merged)
        logger.info(
            "buckets: %d items in %d buckets with fewer than %d (the batch size) merged into "
            "the nearest larger bucket: %s",
            moved,
            len(merged),
            minimum,
            ", ".join(f"{w}x{h}->{t[0]}x{t[1]}" for (w, h), t in sorted(merged.items())),
        )
    return merged


def bucket_summary(sizes: Sequence[Size]) -> str:
    """'512x512: 40, 576x448: 12, ...', the most common first."""
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in Counter(sizes).most_common())


class BucketBatchSampler(Sampler[list]):
    """Batches of one bucket each, for this rank; an epoch is a pure function of (seed, epoch).

    Each epoch shuffles every bucket's items (seed + epoch) and cuts each bucket into full
    batches: its remainder sits this epoch out, as with a DataLoader's drop_last (other items
    each epoch); with `drop_last` False it is a last, smaller batch of that bucket. Then the
    batches are shuffled and dealt round-robin to the ranks, so ranks never share an item and
    each rank's batch at a step is one bucket. Every rank gets the same number of batches (the
    few extra at the end are left out). Yields lists of `(epoch, index)` keys for `SeededItems`;
    `resume(epoch, batches)` makes the next iteration continue `epoch` after `batches` batches.
    """

    def __init__(
        self,
        sizes: Sequence[Size],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        groups = defaultdict(list)
        for index, size in enumerate(sizes):
            groups[tuple(size)].append(index)
        self.groups = [torch.tensor(groups[size]) for size in sorted(groups)]
        self.epoch, self.next_epoch, self.start = 0, 0, 0

    def resume(self, epoch: int, batches: int) -> None:
        self.next_epoch, self.start = epoch, batches

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch` for this rank."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches, size = [], self.batch_size
        for group in self.groups:
            if self.shuffle:
                group = group[torch.randperm(len(group), generator=generator)]
            n = len(group) // size * size if self.drop_last else len(group)
            batches += [group[i : i + size].tolist() for i in range(0, n, size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        rank, world = rank_and_world_size()
        return batches[: len(batches) // world * world][rank::world]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # a generator: the epoch moves on when iteration starts, not when the DataLoader makes
        # an iterator it may discard (it does, once, with workers)
        self.epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        batches, self.start = self.batches(self.epoch)[self.start :], 0
        for batch in batches:
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        size = self.batch_size
        per_group = (len(g) // size if self.drop_last else -(-len(g) // size) for g in self.groups)
        return sum(per_group) // rank_and_world_size()[1]


def item_sizes(dataset: Any) -> list[Size] | None:
    """Each item's bucket, for a bucketed data set (its `bucket_sizes`); None otherwise."""
    sizes = getattr(dataset, "bucket_sizes", None)
    return list(sizes) if sizes is not None else None
