"""Model parts. `ldm.modules.GeneralConditioner` is the path generative-models' SDXL configs
name; it is imported on first use, so importing a submodule does not load the text encoders."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "GeneralConditioner":
        from ldm.modules.conditioner import GeneralConditioner

        return GeneralConditioner
    raise AttributeError(f"module 'ldm.modules' has no attribute {name!r}")
