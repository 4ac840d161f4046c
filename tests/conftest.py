"""Shared test helpers: config loading, reference key manifests, diffusers conversions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
# The reference manifests were recorded with transformers 5, whose CLIPTextModel has no
# `text_model.` level; original SD v1 files (and diffusers, ComfyUI, A1111) have it.
CLIP_PREFIX, CLIP_PREFIX_ORIGINAL = (
    "cond_stage_model.transformer.",
    "cond_stage_model.transformer.text_model.",
)


def load_config(relative: str):
    """An OmegaConf config from configs/."""
    return OmegaConf.load(ROOT / "configs" / relative)


def sd_manifest(version: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the original SD v1 or v2 LatentDiffusion state dict (use_ema off)."""
    raw = json.loads((FIXTURES / f"sd-{version}-state-dict.json").read_text())
    return {
        (CLIP_PREFIX_ORIGINAL + k[len(CLIP_PREFIX) :] if k.startswith(CLIP_PREFIX) else k): tuple(v)
        for k, v in raw.items()
    }


def diffusers_original_config(model_config) -> dict:
    """The `original_config` dict diffusers' single-file converters read."""
    return {"model": OmegaConf.to_container(model_config, resolve=True)}


DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


def run_ddp(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python main.py -t --no-test` as 2 DDP processes on the CPU (gloo), with `args`; the
    test callbacks of tests/probes.py import there too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    command = [sys.executable, str(ROOT / "main.py"), "-t", "--no-test", *DDP, *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def short_run(root: Path, config: str) -> Path:
    """The log dir of `main.py` training configs/tiny/<config> for two small steps in `root`."""
    import main

    main.main(
        ["--base", str(ROOT / "configs" / "tiny" / config), "-t", "--no-test", "-l", str(root)]
        + ["--max_steps", "2", "data.params.batch_size=4", "data.params.num_workers=0"]
        + ["lightning.trainer.limit_val_batches=1"]
    )
    (logdir,) = sorted(root.iterdir())
    return logdir


def fit_fixed_batch(model, x0, cond, t, noise, steps: int, lr: float) -> tuple[list, dict]:
    """(losses, last logs) of `steps` AdamW steps of `model.p_losses` on one fixed batch."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, logs = model.p_losses(x0, cond, t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, logs


def with_live_zero_layers(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with its all-zero tensors refilled: a freshly built UNet's zero-initialised
    output layers make it predict 0 whatever x_t, t and the context."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return module


class RandomImages(torch.utils.data.Dataset):
    """`n` seeded random 32 px images in [-1, 1], each captioned "a red circle"."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 32, 32, 3, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": "a red circle"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped on machines without it (CI never has one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
