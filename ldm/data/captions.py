"""Caption augmentation for tag-style captions (`a photo of sks, dog, grass, sunny`), as kohya's
sd-scripts do it: shuffle the tags after the first `keep_tags`, drop each of those with
probability `tag_dropout`, and prepend a trigger word.

    params:
      captions: {shuffle_tags: true, keep_tags: 1, tag_dropout: 0.1, trigger: sks}

Randomness comes from `np.random`, seeded per item from (seed, epoch, index) for map-style data,
so a caption's shuffle differs per epoch but not per worker or resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from ldm.util import ConfigError, to_plain


@dataclass(frozen=True)
class CaptionOptions:
    """How each caption is changed before encoding (the defaults change nothing).

    Args:
        shuffle_tags: shuffle the tags after the first `keep_tags`.
        keep_tags: how many leading tags stay in place and are never dropped.
        tag_dropout: the probability of dropping each other tag; a caption left empty trains
            as unconditional (and is counted as such).
        trigger: a word put before the caption (after any shuffle or dropout).
        separator: what separates tags; they are joined back with it and a space.
    """

    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    trigger: str = ""
    separator: str = ","

    def __post_init__(self) -> None:
        if not isinstance(self.keep_tags, int) or self.keep_tags < 0:
            raise ConfigError(f"captions.keep_tags: expected an int ≥ 0, got {self.keep_tags!r}")
        if not isinstance(self.tag_dropout, int | float) or not 0 <= self.tag_dropout <= 1:
            raise ConfigError(
                f"captions.tag_dropout: expected a probability in [0, 1], got {self.tag_dropout!r}"
            )
        if not self.separator:
            raise ConfigError("captions.separator: expected a non-empty string")

    @classmethod
    def parse(cls, config: Mapping | None) -> CaptionOptions:
        config = to_plain(config or {})
        names = {f.name for f in fields(cls)}
        if not isinstance(config, Mapping) or set(config) - names:
            unknown = sorted(set(config) - names) if isinstance(config, Mapping) else config
            raise ConfigError(f"captions: unknown keys {unknown}; expected some of {sorted(names)}")
        return cls(**config)

    @property
    def is_random(self) -> bool:
        """Whether the same caption can come out differently (which a latent cache freezes)."""
        return self.shuffle_tags or self.tag_dropout > 0

    def __call__(self, caption: str) -> str:
        if self.is_random:
            tags = [tag.strip() for tag in caption.split(self.separator) if tag.strip()]
            kept, rest = tags[: self.keep_tags], tags[self.keep_tags :]
            if self.shuffle_tags:
                rest = [rest[i] for i in np.random.permutation(len(rest))]
            if self.tag_dropout > 0:
                rest = [tag for tag in rest if np.random.random() >= self.tag_dropout]
            caption = f"{self.separator} ".join(kept + rest)
        if self.trigger:
            caption = f"{self.trigger}{self.separator} {caption}" if caption else self.trigger
        return caption
