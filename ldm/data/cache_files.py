"""The files of a latent cache (`ldm.data.cache`): what one shard holds, how it is encoded and
written, and `CachedLatents`, the map-style data set that reads them back.

    <dir>/<split>/shard-00000.safetensors   per item (row r of the shard), one tensor each:
                                              first_stage_moments.r (2C, h, w): [mean | logvar]
                                              cond_stage_context.r (L, D): the text encoder's
                                              (SDXL: conditioner_output.<i>.<j>.r, each
                                              embedder's outputs)
                                              loss_mask.r (h, w, 1): on the latent grid
                                            metadata: the shard's key, and per row its caption
                                            and its image size (width, height) as JSON
    <dir>/<split>/manifest.json             written last: the cache key, every shard's key and
                                            item count, and each item's image size

Items are stored one tensor each, so that one shard can hold several buckets' shapes. A shard is
encoded in batches of one size, gathered as its items come (the stored row order is the source
order for map-style data; for a stream, the order the samples came in).
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import move_data_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, default_collate

from ldm.checkpoint import write_atomically
from ldm.models.diffusion.conditioning import CONTEXT_KEY, LOSS_MASK_KEY, MOMENTS_KEY
from ldm.util import batch_item

# Bumped when the layout of the files changes, so older caches are rebuilt.
CACHE_FORMAT = 2
MANIFEST = "manifest.json"


def shard_path(root: Path, shard: int) -> Path:
    return root / f"shard-{shard:05d}.safetensors"


def shard_metadata(path: Path) -> dict | None:
    """A shard's metadata (key, captions, sizes), or None if it is missing or unreadable."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # a half-written or foreign file: rebuilt
        return None


def shard_key(path: Path) -> str | None:
    """The key a shard was written with, or None if it is missing or unreadable."""
    return (shard_metadata(path) or {}).get("key")


@torch.no_grad()
def encode_batch(model, batch: Mapping) -> dict[str, torch.Tensor]:
    """The model's posterior moments (B, 2C, h, w), a frozen text encoder's context (B, L, D)
    and the batch's loss mask area-resized to the latent grid (B, h, w, 1)."""
    batch = move_data_to_device(batch, model.device)
    posterior = model.first_stage_posterior(batch)
    out = {MOMENTS_KEY: posterior.parameters.float().cpu()}
    if hasattr(model, "conditioner"):  # SDXL: each embedder's outputs
        out |= model.cache_entries(batch, posterior.parameters)
    elif model.cond_stage_model is not None and not model.cond_stage_trainable:
        captions = list(batch_item(batch, model.cond_stage_key))
        out[CONTEXT_KEY] = model.get_learned_conditioning(captions).float().cpu()
    if LOSS_MASK_KEY in batch:
        mask = batch[LOSS_MASK_KEY].permute(0, 3, 1, 2).float()  # (B, 1, H, W)
        latent = F.interpolate(mask, size=out[MOMENTS_KEY].shape[2:], mode="area")
        out[LOSS_MASK_KEY] = latent.permute(0, 2, 3, 1).cpu()  # (B, h, w, 1)
    return out


class ShardEncoder:
    """Gathers a shard's `(row, item)`s into batches of one image size and encodes each."""

    def __init__(self, model, batch_size: int, context):
        self.model, self.batch_size, self.context = model, batch_size, context
        self.tensors: dict[str, torch.Tensor] = {}
        self.captions: dict[int, str] = {}
        self.sizes: dict[int, list[int]] = {}

    def encode(self, rows: Iterable[tuple[int, Mapping]]) -> tuple[dict, dict]:
        """({"<key>.<row>": tensor}, metadata) of the rows' items."""
        waiting: dict[tuple, list] = {}
        for row, item in rows:
            group = waiting.setdefault(tuple(item["image"].shape), [])
            group.append((row, item))
            if len(group) == self.batch_size:
                self.flush(group)
        for group in waiting.values():
            self.flush(group)
        order = sorted(self.sizes)
        metadata = {
            "captions": json.dumps([self.captions[r] for r in order] if self.captions else []),
            "sizes": json.dumps([self.sizes[r] for r in order]),
        }
        return self.tensors, metadata

    def flush(self, group: list) -> None:
        if not group:
            return
        batch = default_collate([item for _, item in group])
        with self.context():
            encoded = encode_batch(self.model, batch)
        conditional = self.model.cond_stage_model is not None or getattr(
            self.model, "reads_text", False
        )
        captions = batch_item(batch, self.model.cond_stage_key) if conditional else None
        for j, (row, item) in enumerate(group):
            for key, tensor in encoded.items():
                self.tensors[f"{key}.{row}"] = tensor[j].clone()
            height, width = item["image"].shape[:2]
            self.sizes[row] = [int(width), int(height)]
            if captions is not None:
                self.captions[row] = captions[j]
        group.clear()


def write_shard(model, rows, path: Path, key: str, batch_size: int, context) -> None:
    """Encode `rows` (row 0, 1, ... of the shard) and write them to `path`, atomically."""
    tensors, metadata = ShardEncoder(model, batch_size, context).encode(rows)
    metadata["key"] = key
    write_atomically(path, functools.partial(save_file, tensors, metadata=metadata))


def write_manifest(root: Path, key: str, shard_keys: list[str], bucketed: bool) -> None:
    """Mark the cache complete, from its shards' metadata; shards beyond the list are removed."""
    for extra in root.glob("shard-*.safetensors"):
        if int(extra.stem.split("-")[1]) >= len(shard_keys):
            extra.unlink()
    counts, sizes = [], []
    for shard in range(len(shard_keys)):
        shard_sizes = json.loads(shard_metadata(shard_path(root, shard))["sizes"])
        counts.append(len(shard_sizes))
        sizes += shard_sizes
    manifest = {
        "format": CACHE_FORMAT,
        "key": key,
        "shard_keys": shard_keys,
        "counts": counts,
        "length": sum(counts),
        "bucketed": bucketed,
        "sizes": sizes,
    }
    text = json.dumps(manifest)
    write_atomically(root / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def read_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == CACHE_FORMAT else None


class CachedLatents(Dataset):
    """Items `{moments, context, (mask), <caption_key>: str}` read from a latent cache.

    Shards are memory-mapped on first use in each process (DataLoader workers included). A
    cache of bucketed data has `bucket_sizes` (each item's image size), so that the DataModule
    batches it by bucket as it did the images.
    """

    def __init__(self, root: str | Path, key: str | None = None, caption_key: str = "caption"):
        self.root, self.caption_key = Path(root), caption_key
        manifest = read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"{self.root}: no complete latent cache ({MANIFEST} missing)")
        if key is not None and manifest["key"] != key:
            raise ValueError(f"{self.root}: the cache was built for another model or data set")
        self.key, self.length = manifest["key"], manifest["length"]
        self.starts = [0]
        for count in manifest["counts"]:
            self.starts.append(self.starts[-1] + count)
        sizes = [tuple(size) for size in manifest["sizes"]]
        self.bucket_sizes = sizes if manifest["bucketed"] else None
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # file handles stay in the process that made them

    def shard(self, shard: int) -> tuple:
        """(safetensors handle, captions, stored keys) of one shard, opened once per process."""
        if shard not in self._open:
            handle = safe_open(shard_path(self.root, shard), framework="pt")
            fields = sorted({name.rsplit(".", 1)[0] for name in handle.keys()})
            self._open[shard] = handle, json.loads(handle.metadata()["captions"]), fields
        return self._open[shard]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a cache of {self.length} items")
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        handle, captions, fields = self.shard(shard)
        item = {name: handle.get_tensor(f"{name}.{row}") for name in fields}
        return {**item, self.caption_key: captions[row]} if captions else item  # [] if uncond.
