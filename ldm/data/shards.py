"""Captioned images streamed from webdataset `.tar` shards, split by rank and then by worker.

A sample is `key.jpg|jpeg|png|webp` plus `key.txt` or `key.json` (caption under "caption" or
"text"), and with `masks: file` maybe `key.mask.png`. Shards are dealt out round-robin, first
across DDP ranks and then across DataLoader workers, so each sample is read once per epoch as
long as every worker has a shard. With `buckets` the data set yields whole batches of one
bucket each (`batch_by_bucket`, which the DataModule calls with its batch size).
https://github.com/webdataset/webdataset
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.shardlists import expand_urls

from ldm.data.buckets import BucketSpec, Size, cover_scale
from ldm.data.captions import CaptionOptions
from ldm.data.folder import file_identity, list_some
from ldm.data.transform import (
    IMAGE_ERRORS,
    ImageTransform,
    captioned,
    check_options,
    loss_mask,
    open_image,
)

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MASK_KEY = "mask.png"
JSON_CAPTION_KEYS = ("caption", "text")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


def resolve_shards(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a directory, a brace pattern (`data/{000..009}.tar`) or a list."""
    if isinstance(urls, str | Path) and Path(urls).is_dir():
        shards = sorted(str(p) for p in Path(urls).glob("*.tar"))
    elif isinstance(urls, str | Path):
        shards = expand_urls(str(urls))
    else:
        shards = [str(u) for u in urls]
    if not shards:
        raise FileNotFoundError(f"param 'urls' {urls!r}: no .tar shards found")
    local = [s for s in shards if not s.startswith(REMOTE_PREFIXES)]
    missing = [s for s in local if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"param 'urls' {urls!r}: missing shards {list_some(missing)}")
    return shards


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def split_by_rank(
    src: Iterator[Any], rank: int | None = None, world_size: int | None = None
) -> Iterator[Any]:
    """Every `world_size`-th shard from `rank` (explicit, or torch.distributed's)."""
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    yield from islice(src, rank, None, world_size)


def warn_and_skip(exn: Exception) -> bool:
    """webdataset handler: log the error (it names the sample) and go on."""
    logger.warning("skipping webdataset sample: %s", exn)
    return True


def read_caption(sample: dict[str, Any], where: str) -> str:
    """The caption from a sample's `txt`, or its `json` under "caption" / "text"."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        for key in JSON_CAPTION_KEYS:
            if key in meta:
                return str(meta[key]).strip()
        raise ValueError(f"{where}: json has none of {JSON_CAPTION_KEYS}; keys {sorted(meta)}")
    raise ValueError(f"{where}: no caption (expected .txt or .json); has {sorted(sample)}")


class SampleDecoder:
    """Raw webdataset sample -> `{"image": (H, W, 3) float32 in [-1, 1], "caption": str,
    "empty_caption": 0 or 1}` (+ `"loss_mask"` (H, W, 1)), cropped to its bucket or the square.

    Raises ValueError, naming the sample, for what cannot be trained on: no image, an
    unreadable one, no caption, a mask of another size, an image too small (`skip`).
    """

    def __init__(self, transform: ImageTransform, spec, captions, masks, small_images: str):
        self.transform, self.spec, self.captions = transform, spec, captions
        self.masks, self.small_images = masks, small_images
        self.upscaled = 0

    def target(self, size: Size) -> Size:
        return self.spec.nearest(size) if self.spec is not None else (self.transform.size,) * 2

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(
                f"{where}: no image (expected one of {IMAGE_KEYS}); has {sorted(sample)}"
            )
        caption = read_caption(sample, where)
        try:
            image = open_image(sample[image_key])
            mask = loss_mask(self.masks, image, sample.get(MASK_KEY))
        except IMAGE_ERRORS as err:
            raise ValueError(f"{where}: unreadable {image_key} or mask ({err})") from err
        if mask is not None and mask.size != image.size:
            raise ValueError(f"{where}: mask {mask.size} differs from image {image.size} (w, h)")
        target = self.target(image.size)
        if cover_scale(image.size, target) > 1:
            if self.small_images == "skip":
                raise ValueError(f"{where}: {image.size} image is smaller than its crop {target}")
            self.upscaled += 1
        return captioned(self.transform(image, target, mask), self.captions(caption))


def bucket_batches(items: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """Collated batches of `batch_size` items of one size each, as each bucket fills; items
    left in partly filled buckets at the end of the pass are counted in a log line."""
    waiting: dict[tuple, list] = {}
    for item in items:
        bucket = waiting.setdefault(item["image"].shape, [])
        bucket.append(item)
        if len(bucket) == batch_size:
            yield default_collate(bucket)
            bucket.clear()
    left = sum(len(bucket) for bucket in waiting.values())
    if left:
        logger.info("end of a pass over the shards: %d items in unfilled buckets left out", left)


class WebDatasetShards(IterableDataset):
    """Stream `{"image", "caption", "skipped", "empty_caption"}` items from webdataset shards;
    samples that cannot be used are logged, skipped and counted in the next item's "skipped".

    Args:
        urls: a directory of `.tar` files, a brace pattern string, or a list of paths/URLs.
        size, crop, flip_p: the square crop (without buckets) and the augmentation.
        shardshuffle: False, or a buffer size for shuffling shard order (True: all shards).
        shuffle: buffer size for shuffling samples (0: keep the stored order).
        seed: base seed of both shuffles; each pass over the data adds one to it.
        rank, world_size: the DDP split to use; None takes torch.distributed's (or no split).
        buckets, captions, masks, small_images: as `ldm.data.folder.ImageCaptionFolder`'s.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        size: int = 256,
        crop: str = "center",
        flip_p: float = 0.0,
        shardshuffle: bool | int = False,
        shuffle: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        buckets: Mapping | None = None,
        captions: Mapping | None = None,
        masks: str | None = None,
        small_images: str = "upscale",
    ) -> None:
        super().__init__()
        self.shards = resolve_shards(urls)
        if (rank is None) != (world_size is None) or (
            rank is not None and not 0 <= rank < world_size
        ):
            raise ValueError(
                f"params 'rank' ({rank}) and 'world_size' ({world_size}) must both be None, "
                "or satisfy 0 ≤ rank < world_size"
            )
        check_options("WebDatasetShards", masks, small_images)
        self.spec = BucketSpec.parse(buckets)
        self.decoder = SampleDecoder(
            ImageTransform(size, crop, flip_p),
            self.spec,
            CaptionOptions.parse(captions),
            masks,
            small_images,
        )
        self.rank, self.world_size, self.batch_size = rank, world_size, None
        if shardshuffle is True:
            shardshuffle = len(self.shards)
        self.pipeline = self.build_pipeline(shardshuffle, shuffle, seed)

    def build_pipeline(self, shardshuffle: int, shuffle: int, seed: int) -> wds.DataPipeline:
        """shards -> rank split -> worker split -> (shuffle) -> raw samples."""
        splitter = functools.partial(split_by_rank, rank=self.rank, world_size=self.world_size)
        pipeline = wds.WebDataset(
            self.shards,
            handler=warn_and_skip,
            shardshuffle=shardshuffle,
            detshuffle=True,  # seed + epoch: reproducible, and each epoch differs
            seed=seed,
            nodesplitter=splitter,
            workersplitter=wds.split_by_worker,
            empty_check=False,  # a worker without shards yields nothing; warned about in __iter__
        )
        if shuffle > 0:
            pipeline = pipeline.compose(wds.filters.detshuffle(shuffle, seed=seed))
        return pipeline

    def batch_by_bucket(self, batch_size: int) -> None:
        """Yield collated batches of `batch_size` items of one bucket each, not items."""
        self.batch_size = batch_size

    @property
    def random_captions(self) -> bool:
        return self.decoder.captions.is_random

    def shard_identity(self, shard: int) -> str:
        """What changes when shard `shard`'s file does (its size and mtime), for a cache key."""
        url = self.shards[shard]
        return file_identity(Path(url)) if Path(url).is_file() else url

    def shard_items(self, shard: int) -> Iterator[dict[str, Any]]:
        """The decoded items of one shard in stored order, without rank or worker split."""
        return self.decoded(iter(wds.WebDataset(self.shards[shard], handler=warn_and_skip)))

    def decoded(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Decoded items; "skipped" counts the samples passed over before each one."""
        skipped = 0
        for sample in samples:
            try:
                item = self.decoder(sample)
            except ValueError as err:
                logger.warning("skipping webdataset sample: %s", err)
                skipped += 1
                continue
            yield {**item, "skipped": skipped}
            skipped = 0
        if self.decoder.upscaled:
            logger.warning(
                "%d images smaller than their crop were upscaled in this pass (blurrier than "
                "the rest; small_images: skip leaves them out)",
                self.decoder.upscaled,
            )
            self.decoder.upscaled = 0

    def check_split(self) -> None:
        """Warn (once, from rank 0's first worker) when ranks or workers get unequal shares."""
        rank, world_size = (
            (self.rank, self.world_size) if self.rank is not None else distributed_rank()
        )
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(self.shards)
        if rank == 0 and worker == 0 and (n % world_size or n < world_size * workers):
            logger.warning(
                "%d shards over %d ranks × %d workers: some get fewer samples or none "
                "(uneven ranks can stall DDP at epoch end); use a multiple of the ranks",
                n,
                world_size,
                workers,
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.check_split()
        items = self.decoded(iter(self.pipeline))
        if self.batch_size is not None:
            yield from bucket_batches(items, self.batch_size)
        else:
            yield from items
