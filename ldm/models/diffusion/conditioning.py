"""Caption dropout for classifier-free guidance: which captions a training batch drops, and to what.

Ho & Salimans 2022 (classifier-free guidance): the model learns the unconditional prediction
from the captions replaced by `val` (the empty caption in SD's recipe) with probability `p`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.util import KEY_ALIASES


def parse_ucg_training(config: Mapping | None) -> dict[str, dict]:
    """Validate `ucg_training: {key: {p: 0.1, val: ""}}` (caption dropout, as the original)."""
    parsed = {}
    for key, entry in (config or {}).items():
        p = entry.get("p") if isinstance(entry, Mapping) else None
        if not isinstance(p, int | float) or not 0 <= p <= 1 or set(entry) - {"p", "val"}:
            raise ValueError(f"ucg_training.{key}: expected {{p: probability in [0, 1], val: ...}}")
        parsed[key] = {"p": float(p), "val": entry.get("val") or ""}
        parsed[KEY_ALIASES.get(key, key)] = parsed[key]
    return parsed


def drop_mask(n: int, p: float) -> torch.Tensor:
    """(n,) bool, each True with probability p: the captions to drop for CFG training."""
    return torch.rand(n) < p


def drop_conditioning(c: list, p: float, val) -> list:
    """Replace each entry of `c` by `val` with probability p, so the model learns the
    unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022)."""
    drop = drop_mask(len(c), p).tolist()
    return [val if d else item for item, d in zip(c, drop, strict=True)]
