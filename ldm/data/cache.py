"""Precomputed first-stage latents and text embeddings on disk, so training skips VAE and CLIP.

`LatentCache` (a Lightning callback, configured under `lightning.callbacks`) encodes each
configured split of the data set once, before training, into safetensors shards (the layout is
in `ldm.data.cache_files`), then serves the split from `CachedLatents`, whose items the model
reads instead of images and captions. The posterior is stored rather than one sample of it, so
each epoch still draws a fresh latent, as the uncached path does.

Map-style data sets (image folders, mixes, synthetic data) are cached `shard_size` items a
shard; a webdataset source (`WebDatasetShards`) one cache shard per `.tar`. Bucketed data keeps
each item's bucket, and the cache is served in the same one-bucket batches (exactly, resumably,
split across ranks: a cached stream becomes map-style data).

The key of the cache hashes everything that decides its contents: the first and condition
stages' weights and configs, the data set's config, length and buckets, the precision. Each
shard's key adds what its items are read from: for files, each file's size and modification
time (`os.stat`), not a hash of its bytes, because the key is checked at every launch and
reading a whole data set to hash it would take minutes for large ones; any rewrite of a file
changes its mtime. (A tool that rewrites a file and then restores its old size and mtime would
go unnoticed: delete the cache then.) A shard whose key differs is rebuilt, alone, so editing
one image re-encodes one shard and an interrupted build resumes. Under DDP each rank encodes
every `world_size`-th shard, and rank 0 writes the manifest once all have finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, IterableDataset
from tqdm import tqdm

from ldm.data.buckets import item_sizes
from ldm.data.cache_files import (
    CACHE_FORMAT,
    CachedLatents,
    read_manifest,
    shard_key,
    shard_path,
    write_manifest,
    write_shard,
)
from ldm.util import ConfigError, to_plain

logger = logging.getLogger(__name__)

__all__ = ["CachedLatents", "LatentCache", "build_cache", "fingerprint", "write_manifest"]


def fingerprint(model: torch.nn.Module, identity: Mapping) -> str:
    """sha256 over `identity` (JSON) and the weights of the stages whose outputs are cached."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=to_plain).encode())
    stages = ["first_stage_model"]
    if not model.cond_stage_trainable:  # a trained text encoder's output is not cached
        stages.append("conditioner" if hasattr(model, "conditioner") else "cond_stage_model")
    for name in stages:
        stage = getattr(model, name, None)
        for key, tensor in sorted((stage.state_dict() if stage is not None else {}).items()):
            digest.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_conditioner(conditioner) -> None:
    """Raise unless an SDXL conditioner's outputs can be cached: frozen embedders without
    adapters, inputs never replaced (legacy_ucg_value), contexts of one length."""
    for i, (embedder, spec) in enumerate(
        zip(conditioner.embedders, conditioner.specs, strict=True)
    ):
        where = f"LatentCache: the conditioner's embedder {i} ({type(embedder).__name__})"
        if spec.is_trainable or i in conditioner.adapted:
            raise ConfigError(f"{where} trains (is_trainable or LoRA): train it uncached")
        if spec.legacy_ucg_value is not None:
            raise ConfigError(
                f"{where} replaces captions before encoding (legacy_ucg_value); use ucg_rate "
                "or the model's caption_dropout, which act on cached outputs, or no cache"
            )
        if getattr(embedder, "long_prompts", "") == "chunk":
            raise ConfigError(
                f"{where} has long_prompts: chunk, whose contexts differ in length from caption "
                "to caption; use long_prompts: truncate with the cache"
            )


class CacheSource:
    """A split's data set as cache shards: how many, what each one's key hashes, its items.

    Map-style data: `shard_size` items a shard, keyed by each item's `item_identity` (file
    sizes and mtimes) where the data set has one. A stream: one shard per `.tar` (it must have
    `shard_items` and `shard_identity`, as `WebDatasetShards` does).
    """

    def __init__(self, dataset: Dataset, shard_size: int, where: str):
        self.dataset, self.shard_size = dataset, shard_size
        self.streamed = isinstance(dataset, IterableDataset)
        if self.streamed and not hasattr(dataset, "shard_items"):
            raise TypeError(
                f"LatentCache: {where} is a streamed data set ({type(dataset).__name__}) that "
                "cannot be read shard by shard; cache map-style data or WebDatasetShards"
            )
        spec = getattr(dataset, "spec", None)  # a bucketed stream's
        self.bucketed = item_sizes(dataset) is not None or spec is not None

    def __len__(self) -> int:
        if self.streamed:
            return len(self.dataset.shards)
        return -(-len(self.dataset) // self.shard_size)

    def identity(self) -> dict:
        """What of the data set goes into the cache key besides its config."""
        if self.streamed:
            return {"shards": list(self.dataset.shards)}
        return {"length": len(self.dataset), "buckets": item_sizes(self.dataset)}

    def indices(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, len(self.dataset)))

    def shard_keys(self, key: str) -> list[str]:
        """Each shard's key: `key` and the identities of what the shard is read from."""
        keys = []
        for shard in range(len(self)):
            if self.streamed:
                parts = [self.dataset.shard_identity(shard)]
            else:
                identity = getattr(self.dataset, "item_identity", None)
                parts = [identity(i) if identity else str(i) for i in self.indices(shard)]
            keys.append(hashlib.sha256("\n".join([key, *parts]).encode()).hexdigest())
        return keys

    def rows(self, shard: int) -> Iterator[tuple[int, Mapping]]:
        """(row, item) of one shard, row 0 first."""
        if self.streamed:
            return enumerate(self.dataset.shard_items(shard))
        start = shard * self.shard_size
        return ((i - start, self.dataset[i]) for i in self.indices(shard))


def build_cache(
    model,
    source: CacheSource,
    root: Path,
    shard_keys: Sequence[str],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    context=torch.no_grad,
) -> list[int]:
    """Encode this rank's out-of-date shards of `source` into `root`; returns the shards built.

    Rank 0 writes the manifest separately (`write_manifest`), after every rank has finished.
    """
    root.mkdir(parents=True, exist_ok=True)
    shards = range(rank, len(shard_keys), world_size)
    stale = [s for s in shards if shard_key(shard_path(root, s)) != shard_keys[s]]
    for shard in tqdm(stale, desc=f"caching {root.name} latents", disable=rank != 0 or not stale):
        rows = source.rows(shard)
        write_shard(model, rows, shard_path(root, shard), shard_keys[shard], batch_size, context)
    return stale


class LatentCache(pl.Callback):
    """Before a run, cache the latents and text embeddings of `splits` in `dir` and train on them.

    Args:
        dir: the cache's root; each split gets a subdirectory.
        splits: the data module's splits to cache (those it configures).
        shard_size: items per safetensors shard.
        batch_size: items per encoder batch while building.
    """

    def __init__(
        self,
        dir: str,
        splits: Sequence[str] = ("train", "validation"),
        shard_size: int = 1024,
        batch_size: int = 32,
    ) -> None:
        if shard_size < 1 or batch_size < 1:
            raise ValueError(
                f"LatentCache: shard_size and batch_size must be ≥ 1, got "
                f"{shard_size} and {batch_size}"
            )
        self.dir, self.splits = Path(dir), list(splits)
        self.shard_size, self.batch_size = shard_size, batch_size

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        data = trainer.datamodule
        if not hasattr(data, "dataset_configs") or not hasattr(pl_module, "first_stage_model"):
            raise TypeError(
                "LatentCache needs a LatentDiffusion model and a ldm.data.DataModuleFromConfig"
            )
        data.setup(stage)
        pl_module.to(trainer.strategy.root_device)  # encode where training will run
        for split in self.splits:
            if split in data.datasets:
                data.datasets[split] = self.cached(trainer, pl_module, data, split)

    def cached(self, trainer: pl.Trainer, model, data, split: str) -> CachedLatents:
        dataset = data.datasets[split]
        source = CacheSource(dataset, self.shard_size, f"data.params.{split}")
        if any(w != 1 for w in getattr(dataset, "loss_weights", ())):
            raise ConfigError(
                f"LatentCache: data.params.{split} weighs its items ({dataset}), and the cache "
                "keeps no loss weights: train this mix without the cache"
            )
        if hasattr(model, "conditioner"):
            check_conditioner(model.conditioner)
        elif model.model.conditioning_key not in (None, "crossattn"):
            raise ConfigError(
                f"LatentCache: the model's conditioning_key is {model.model.conditioning_key}, "
                "whose image conditioning (e.g. inpainting's random masks) is made per step; "
                "the cache stores text-to-image inputs only: train this model uncached"
            )
        encoder = model.cond_stage_model
        if not model.cond_stage_trainable and getattr(encoder, "long_prompts", "") == "chunk":
            raise ConfigError(
                "LatentCache: the text encoder has long_prompts: chunk, whose contexts differ in "
                "length from caption to caption, and the cache stores them for batches of one "
                "length; train with the cache and long_prompts: truncate, or without the cache"
            )
        warn_if_augmented(data.dataset_configs[split], split, dataset)
        identity = {
            "format": CACHE_FORMAT,
            "data": data.dataset_configs[split],
            "model": model.cache_identity,
            "precision": str(trainer.precision),
            "shard_size": self.shard_size,
            **source.identity(),
        }
        key = fingerprint(model, identity)
        shard_keys = source.shard_keys(key)
        root = self.dir / split
        manifest = read_manifest(root)
        if manifest is None or (manifest["key"], manifest["shard_keys"]) != (key, shard_keys):
            self.build(trainer, model, source, root, shard_keys)
            if trainer.global_rank == 0:
                write_manifest(root, key, shard_keys, source.bucketed)
        trainer.strategy.barrier("latent_cache_ready")
        cached = CachedLatents(root, key, model.cond_stage_key)
        if split == "train":
            warn_small_buckets(cached, data.batch_size)
        return cached

    def build(self, trainer: pl.Trainer, model, source: CacheSource, root: Path, keys) -> None:
        """Encode this rank's stale shards in eval mode, then wait for every rank."""
        was_training = model.training
        model.eval()
        built = build_cache(
            model,
            source,
            root,
            keys,
            self.batch_size,
            trainer.global_rank,
            trainer.world_size,
            trainer.precision_plugin.forward_context,
        )
        model.train(was_training)
        trainer.strategy.barrier("latent_cache_built")
        if trainer.global_rank == 0:
            logger.info("%s: cached %d of %d shards", root, len(built), len(keys))


def warn_if_augmented(config: Mapping, split: str, dataset) -> None:
    """Random flips, crops and caption changes are frozen into a cache at build time: say so."""
    params = config.get("params") or {}
    if params.get("flip_p") or params.get("crop") == "random":
        logger.warning(
            "LatentCache: data.params.%s has random flips or crops; the cache keeps the ones "
            "drawn while building it, the same every epoch",
            split,
        )
    if getattr(dataset, "random_captions", False):
        logger.warning(
            "LatentCache: data.params.%s shuffles or drops caption tags; the cache keeps the "
            "captions drawn while building it, the same every epoch",
            split,
        )


def warn_small_buckets(cached: CachedLatents, batch_size: int) -> None:
    """A cached stream keeps each image's bucket: those that cannot fill a batch are left out."""
    if cached.bucket_sizes is None:
        return
    small = {size: n for size, n in Counter(cached.bucket_sizes).items() if n < batch_size}
    if small:
        logger.warning(
            "LatentCache: %d cached items in %d buckets with fewer than batch_size %d items are "
            "never in a batch: %s",
            sum(small.values()),
            len(small),
            batch_size,
            ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(small.items())),
        )
