"""Diffusion models. `ldm.models.diffusion.DiffusionEngine` is the path generative-models'
SDXL configs name; it is imported on first use."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "DiffusionEngine":
        from ldm.models.diffusion.engine import DiffusionEngine

        return DiffusionEngine
    raise AttributeError(f"module 'ldm.models.diffusion' has no attribute {name!r}")
