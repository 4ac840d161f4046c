"""Several data sets as one: per source, repeats, a caption prefix and a weight in the loss.

    train:
      target: ldm.data.mix.DataMix
      params:
        sources:
          - dataset:    # DreamBooth's instance images, under a rare identifier
              target: ldm.data.folder.ImageCaptionFolder
              params: {root: data/dog, size: 512, caption: "a photo of sks dog"}
            repeats: 100
          - dataset:    # the class prior: images of the class, made by the base model
              target: ldm.data.folder.ImageCaptionFolder
              params: {root: data/class-dog, size: 512, caption: "a photo of a dog"}
            loss_weight: 1.0    # prior_loss_weight

A source's items come `repeats` times an epoch (kohya's num_repeats), so repeats balance a
handful of instance images against hundreds of class images. Each item carries its
`loss_weight`, by which the model weighs its loss (`DiffusionLoss`), as kohya weighs
regularisation images; DreamBooth's prior-preservation loss (Ruiz et al. 2023) is the class
source at loss_weight = prior_loss_weight.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from ldm.data.buckets import Size, item_sizes
from ldm.models.diffusion.conditioning import LOSS_WEIGHT_KEY
from ldm.util import ConfigError, instantiate_from_config, to_plain

SOURCE_KEYS = {"dataset", "repeats", "caption_prefix", "loss_weight"}


@dataclass
class Source:
    dataset: Any
    repeats: int = 1
    caption_prefix: str = ""
    loss_weight: float = 1.0

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats


def parse_source(index: int, config: Mapping) -> Source:
    where = f"DataMix sources[{index}]"
    config = to_plain(config)
    if not isinstance(config, Mapping) or "dataset" not in config:
        raise ConfigError(f"{where}: expected {{dataset: {{target, params}}, repeats, ...}}")
    if unknown := sorted(set(config) - SOURCE_KEYS):
        raise ConfigError(
            f"{where}: unknown keys {unknown}; expected some of {sorted(SOURCE_KEYS)}"
        )
    repeats, weight = config.get("repeats", 1), config.get("loss_weight", 1.0)
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"{where}.repeats {repeats!r}: expected an integer >= 1")
    if not isinstance(weight, int | float) or weight < 0:
        raise ConfigError(f"{where}.loss_weight {weight!r}: expected a number >= 0")
    dataset = instantiate_from_config(config["dataset"])
    if len(dataset) == 0:
        raise ConfigError(f"{where}: its data set {config['dataset'].get('target')} is empty")
    return Source(dataset, repeats, config.get("caption_prefix", ""), float(weight))


class DataMix(Dataset):
    """The sources' items one after another, each source `repeats` times."""

    def __init__(self, sources: Sequence[Mapping]):
        if not sources:
            raise ConfigError("DataMix: sources is empty; give at least one {dataset: ...}")
        self.sources = [parse_source(i, source) for i, source in enumerate(sources)]
        self.ends = []
        for source in self.sources:
            self.ends.append((self.ends[-1] if self.ends else 0) + len(source))

    def __len__(self) -> int:
        return self.ends[-1]

    @property
    def loss_weights(self) -> list[float]:
        """Each source's loss weight."""
        return [source.loss_weight for source in self.sources]

    @property
    def bucket_sizes(self) -> list[Size] | None:
        """Each item's bucket when the sources are bucketed (all of them or none)."""
        sizes = [item_sizes(source.dataset) for source in self.sources]
        if all(s is None for s in sizes):
            return None
        if any(s is None for s in sizes):
            raise ConfigError(
                "DataMix: some sources have buckets and some not; a batch holds one bucket, "
                "so give every source the same `buckets:`"
            )
        repeated = [s * source.repeats for s, source in zip(sizes, self.sources, strict=True)]
        return [size for s in repeated for size in s]

    def merge_buckets(self, merged: Mapping[Size, Size]) -> None:
        for source in self.sources:
            source.dataset.merge_buckets(merged)

    @property
    def random_captions(self) -> bool:
        return any(getattr(source.dataset, "random_captions", False) for source in self.sources)

    def locate(self, index: int) -> tuple[Source, int]:
        """The source of item `index` and the index in its data set."""
        if not 0 <= index < len(self):
            raise IndexError(f"DataMix index {index} out of range for {len(self)} items")
        which = bisect.bisect_right(self.ends, index)
        source = self.sources[which]
        start = self.ends[which - 1] if which else 0
        return source, (index - start) % len(source.dataset)

    def item_identity(self, index: int) -> str:
        source, inner = self.locate(index)
        identity = getattr(source.dataset, "item_identity", None)
        return identity(inner) if identity is not None else ""

    def __getitem__(self, index: int) -> dict:
        source, inner = self.locate(index)
        item = dict(source.dataset[inner])
        if source.caption_prefix:
            item["caption"] = source.caption_prefix + item["caption"]
        item[LOSS_WEIGHT_KEY] = source.loss_weight
        return item

    def __repr__(self) -> str:
        parts = [f"{len(s.dataset)} x {s.repeats} (w {s.loss_weight})" for s in self.sources]
        return f"DataMix({', '.join(parts)})"
