"""Precomputed first-stage latents and text embeddings on disk, so training skips VAE and CLIP.

`LatentCache` (a Lightning callback, configured under `lightning.callbacks`) encodes each
configured split of the data set once, before training, into safetensors shards:

    <dir>/<split>/shard-00000.safetensors   moments (n, 2C, h, w): the posterior's [mean | logvar]
                                            context (n, L, D): the frozen text encoder's output
                                            metadata: the cache key and the n captions (JSON)
    <dir>/<split>/manifest.json             written last: the key, item count and shard size

It then serves the split from `CachedLatents`, whose items the model reads instead of images and
captions. The posterior is stored rather than one sample of it, so each epoch still draws a fresh
latent, as the uncached path does. The key hashes everything that decides the contents (the
first and condition stages' weights and configs, the data set's config and length, the
precision): a cache whose key differs is rebuilt, shard by shard, so an interrupted build
resumes. Under DDP each rank encodes every `world_size`-th shard, and rank 0 writes the manifest
once all have finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import move_data_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from ldm.checkpoint import write_atomically
from ldm.models.diffusion.conditioning import CONTEXT_KEY, MOMENTS_KEY
from ldm.util import ConfigError, batch_item, to_plain

logger = logging.getLogger(__name__)

# Bumped when the layout of the files changes, so older caches are rebuilt.
CACHE_FORMAT = 1
MANIFEST = "manifest.json"


def fingerprint(model: torch.nn.Module, identity: Mapping) -> str:
    """sha256 over `identity` (JSON) and the weights of the stages whose outputs are cached."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=to_plain).encode())
    stages = ["first_stage_model"]
    if not model.cond_stage_trainable:  # a trained text encoder's output is not cached
        stages.append("cond_stage_model")
    for name in stages:
        stage = getattr(model, name, None)
        for key, tensor in sorted((stage.state_dict() if stage is not None else {}).items()):
            digest.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shard_path(root: Path, shard: int) -> Path:
    return root / f"shard-{shard:05d}.safetensors"


def shard_key(path: Path) -> str | None:
    """The cache key a shard was written with, or None if it is missing or unreadable."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("key")
    except Exception:  # a half-written or foreign file: rebuilt
        return None


@torch.no_grad()
def encode_batch(model, batch: Mapping) -> dict[str, torch.Tensor]:
    """The model's posterior moments (B, 2C, h, w) and, for a frozen text encoder, its context."""
    posterior = model.first_stage_posterior(move_data_to_device(batch, model.device))
    out = {MOMENTS_KEY: posterior.parameters.float().cpu()}
    if model.cond_stage_model is not None and not model.cond_stage_trainable:
        captions = list(batch_item(batch, model.cond_stage_key))
        out[CONTEXT_KEY] = model.get_learned_conditioning(captions).float().cpu()  # (B, L, D)
    return out


def encode_shard(model, dataset: Dataset, indices: range, batch_size: int, context) -> tuple:
    """({key: (n, ...) tensor}, captions) of the items at `indices`, encoded in batches; no
    captions for an unconditional model."""
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size)
    parts, captions = [], []
    for batch in loader:
        with context():
            parts.append(encode_batch(model, batch))
        if model.cond_stage_model is not None:
            captions += list(batch_item(batch, model.cond_stage_key))
    tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return tensors, captions


def build_cache(
    model,
    dataset: Dataset,
    root: Path,
    key: str,
    shard_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    context=torch.no_grad,
) -> list[int]:
    """Encode this rank's out-of-date shards of `dataset` into `root`; returns the shards built.

    Rank 0 writes the manifest separately (`write_manifest`), after every rank has finished.
    """
    root.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(dataset) // shard_size)
    stale = [s for s in range(rank, n_shards, world_size) if shard_key(shard_path(root, s)) != key]
    for shard in tqdm(stale, desc=f"caching {root.name} latents", disable=rank != 0 or not stale):
        indices = range(shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
        tensors, captions = encode_shard(model, dataset, indices, batch_size, context)
        metadata = {"key": key, "captions": json.dumps(captions)}
        write_atomically(
            shard_path(root, shard), functools.partial(save_file, tensors, metadata=metadata)
        )
    return stale


def write_manifest(root: Path, key: str, length: int, shard_size: int) -> None:
    """Mark the cache complete; shards beyond `length` (from a longer data set) are removed."""
    n_shards = -(-length // shard_size)
    for extra in root.glob("shard-*.safetensors"):
        if int(extra.stem.split("-")[1]) >= n_shards:
            extra.unlink()
    manifest = {"format": CACHE_FORMAT, "key": key, "length": length, "shard_size": shard_size}
    text = json.dumps(manifest, indent=1)
    write_atomically(root / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def read_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == CACHE_FORMAT else None


class CachedLatents(Dataset):
    """Items `{moments, context, <caption_key>: str}` read from a cache that `LatentCache` built.

    Shards are memory-mapped on first use in each process (DataLoader workers included).
    """

    def __init__(self, root: str | Path, key: str | None = None, caption_key: str = "caption"):
        self.root, self.caption_key = Path(root), caption_key
        manifest = read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"{self.root}: no complete latent cache ({MANIFEST} missing)")
        if key is not None and manifest["key"] != key:
            raise ValueError(f"{self.root}: the cache was built for another model or data set")
        self.length, self.shard_size = manifest["length"], manifest["shard_size"]
        self.key = manifest["key"]
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # file handles stay in the process that made them

    def shard(self, shard: int) -> tuple:
        """(safetensors handle, captions) of one shard, opened once per process."""
        if shard not in self._open:
            handle = safe_open(shard_path(self.root, shard), framework="pt")
            self._open[shard] = handle, json.loads(handle.metadata()["captions"])
        return self._open[shard]  # captions: [] for an unconditional model

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a cache of {self.length} items")
        handle, captions = self.shard(index // self.shard_size)
        row = index % self.shard_size
        item = {key: handle.get_slice(key)[row] for key in handle.keys()}
        return {**item, self.caption_key: captions[row]} if captions else item


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
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"LatentCache: data.params.{split} is a streamed data set "
                f"({type(dataset).__name__}); only map-style data sets can be cached"
            )
        if any(w != 1 for w in getattr(dataset, "loss_weights", ())):
            raise ConfigError(
                f"LatentCache: data.params.{split} weighs its items ({dataset}), and the cache "
                "keeps no loss weights: train this mix without the cache"
            )
        warn_if_augmented(data.dataset_configs[split], split)
        identity = {
            "format": CACHE_FORMAT,
            "data": data.dataset_configs[split],
            "length": len(dataset),
            "model": model.cache_identity,
            "precision": str(trainer.precision),
            "shard_size": self.shard_size,
        }
        key = fingerprint(model, identity)
        root = self.dir / split
        strategy = trainer.strategy
        manifest = read_manifest(root)
        if manifest is None or manifest["key"] != key:
            was_training = model.training
            model.eval()
            built = build_cache(
                model,
                dataset,
                root,
                key,
                self.shard_size,
                self.batch_size,
                trainer.global_rank,
                trainer.world_size,
                trainer.precision_plugin.forward_context,
            )
            model.train(was_training)
            strategy.barrier("latent_cache_built")
            if trainer.global_rank == 0:
                write_manifest(root, key, len(dataset), self.shard_size)
                logger.info("%s: cached %d shards of %s", root, len(built), split)
        strategy.barrier("latent_cache_ready")
        return CachedLatents(root, key, model.cond_stage_key)


def warn_if_augmented(config: Mapping, split: str) -> None:
    """Random flips and crops are frozen into a cache at build time: say so."""
    params = config.get("params") or {}
    if params.get("flip_p") or params.get("crop") == "random":
        logger.warning(
            "LatentCache: data.params.%s has random flips or crops; the cache keeps the ones "
            "drawn while building it, the same every epoch",
            split,
        )
