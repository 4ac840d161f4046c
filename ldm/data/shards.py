"""Captioned images streamed from webdataset `.tar` shards, split by rank and then by worker.

A sample is `key.jpg|jpeg|png|webp` plus `key.txt` or `key.json` (caption under "caption" or
"text"). Shards are dealt out round-robin, first across DDP ranks and then across DataLoader
workers, so each sample is read once per epoch as long as every worker has a shard.
https://github.com/webdataset/webdataset
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from ldm.data.folder import IMAGE_ERRORS, ImageTransform, list_some, open_rgb

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
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


def decode_sample(sample: dict[str, Any], transform: ImageTransform) -> dict[str, Any]:
    """Raw webdataset sample -> `{"image": (H, W, 3) float32 in [-1, 1], "caption": str}`."""
    where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')}"
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise ValueError(f"{where}: no image (expected one of {IMAGE_KEYS}); has {sorted(sample)}")
    try:
        image = transform(open_rgb(sample[image_key]))
    except IMAGE_ERRORS as err:
        raise ValueError(f"{where}: unreadable {image_key} ({err})") from err
    return {"image": image, "caption": read_caption(sample, where)}


class WebDatasetShards(IterableDataset):
    """Stream `{"image", "caption"}` items from webdataset shards; corrupt samples are logged
    and skipped.

    Args:
        urls: a directory of `.tar` files, a brace pattern string, or a list of paths/URLs.
        shardshuffle: False, or a buffer size for shuffling shard order (True: all shards).
        shuffle: buffer size for shuffling samples (0: keep the stored order).
        seed: base seed of both shuffles; each pass over the data adds one to it.
        rank, world_size: the DDP split to use; None takes torch.distributed's (or no split).
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
    ) -> None:
        super().__init__()
        self.shards = resolve_shards(urls)
        self.transform = ImageTransform(size, crop, flip_p)
        if (rank is None) != (world_size is None) or (
            rank is not None and not 0 <= rank < world_size
        ):
            raise ValueError(
                f"params 'rank' ({rank}) and 'world_size' ({world_size}) must both be None, "
                "or satisfy 0 ≤ rank < world_size"
            )
        self.rank, self.world_size = rank, world_size
        if shardshuffle is True:
            shardshuffle = len(self.shards)
        self.pipeline = self.build_pipeline(shardshuffle, shuffle, seed)

    def build_pipeline(self, shardshuffle: int, shuffle: int, seed: int) -> wds.DataPipeline:
        """shards -> rank split -> worker split -> (shuffle) -> samples -> decoded items."""
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
        decode = functools.partial(decode_sample, transform=self.transform)
        return pipeline.map(decode, handler=warn_and_skip)

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
        yield from self.pipeline
