"""Load a model for sampling or export, and the pieces the txt2img / img2img command lines share.

A model comes from a checkpoint (a `main.py` `.ckpt`, or an original SD `.ckpt` /
`.safetensors`) and a config; a `main.py` log dir (or a checkpoint inside one) brings its own
saved config. EMA weights, when the file has them, are swapped into the UNet's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid

from ldm.checkpoint import (
    EMA_PREFIX,
    CheckpointError,
    filter_keys,
    fitting_state_dict,
    load_weights,
    read_state_dict,
)
from ldm.models.diffusion.ddpm import DDPM
from ldm.util import get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

MODEL_PREFIX = "model."
DEVICES = ("cuda", "cpu", "mps")


def run_files(path: str | os.PathLike) -> tuple[list[Path], Path]:
    """(saved configs, checkpoint) of a `main.py` log dir, or of a checkpoint inside one.

    The config list is empty when `path` is a checkpoint outside any log dir.
    """
    path = Path(path)
    if path.is_dir():
        configs = sorted((path / "configs").glob("*-project.yaml"))
        if not configs:
            raise CheckpointError(f"{path} is a directory without configs/*-project.yaml")
        return configs, path / "checkpoints" / "last.ckpt"
    logdir = path.parent.parent
    if path.parent.name == "checkpoints":
        return sorted((logdir / "configs").glob("*-project.yaml")), path
    return [], path


def ema_key(key: str) -> str:
    """The LitEma buffer name of a `model.*` parameter: "model_ema." + its path without dots."""
    return EMA_PREFIX + key[len(MODEL_PREFIX) :].replace(".", "")


def swap_in_ema(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, bool]:
    """(state dict with the EMA copy in place of the `model.*` weights and no `model_ema.*`,
    whether there was an EMA copy to swap in)."""
    has_ema = any(k.startswith(EMA_PREFIX) for k in state_dict)
    swapped = {
        k: state_dict.get(ema_key(k), v) if k.startswith(MODEL_PREFIX) else v
        for k, v in filter_keys(state_dict, [EMA_PREFIX]).items()
    }
    return swapped, has_ema


def inference_config(configs: Sequence[str | os.PathLike]) -> DictConfig:
    """The merged config, set up to build a model whose weights all come from one file."""
    config = OmegaConf.merge(*(OmegaConf.load(c) for c in configs))
    if "model" not in config:
        raise CheckpointError(f"config {[str(c) for c in configs]} has no 'model' section")
    params = config.model.setdefault("params", {})
    params.ckpt_path = None  # every weight comes from the checkpoint given
    if issubclass(get_obj_from_str(config.model.target), DDPM):
        params.use_ema = False  # the EMA copy, if any, is swapped in instead
    if "first_stage_config" in params:
        params.first_stage_config.setdefault("params", {}).ckpt_path = None
    return config


def load_model(
    ckpt: str | os.PathLike,
    config: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    *,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    unsafe_pickle: bool = False,
) -> tuple[torch.nn.Module, DictConfig]:
    """(model in eval mode on `device`, config) from a checkpoint or `main.py` log dir.

    `config` (one or more YAML files) overrides the log dir's own. With `use_ema`, the file's
    EMA weights are used where it has them. A checkpoint that does not fit the config raises
    CheckpointError naming the keys.
    """
    run_configs, ckpt = run_files(ckpt)
    if config is None:
        configs = run_configs
    else:
        configs = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    if not configs:
        raise CheckpointError(f"{ckpt} is not inside a main.py log dir: give its config too")
    for path in configs:
        if not Path(path).is_file():
            raise CheckpointError(f"config {str(path)!r} does not exist")
    config = inference_config(configs)
    state_dict = read_state_dict(ckpt, unsafe_pickle=unsafe_pickle)
    if use_ema:
        state_dict, swapped = swap_in_ema(state_dict)
        logger.info("%s: using %s weights", ckpt, "EMA" if swapped else "its (no EMA copy)")
    try:
        with torch.device("meta"):  # check the keys before building the real thing
            fitting_state_dict(instantiate_from_config(config.model), state_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{ckpt} with config {[str(c) for c in configs]}: {err}") from err
    model = instantiate_from_config(config.model)
    load_weights(model, state_dict)
    return model.to(device).eval(), config


def choose_device(name: str | None = None) -> torch.device:
    """The named device, or the best available: cuda, then mps, then cpu."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name not in DEVICES:
        raise ValueError(f"--device {name!r}: expected one of {DEVICES}")
    available = {"cuda": torch.cuda.is_available, "cpu": lambda: True}
    if not available.get(name, lambda: torch.backends.mps.is_available())():
        raise ValueError(f"--device {name}: not available on this machine")
    return torch.device(name)


def precision_scope(precision: str, device: torch.device):
    """ "autocast": fp16 autocast on CUDA / MPS, bf16 on the CPU; "full": plain fp32."""
    if precision == "full":
        return contextlib.nullcontext()
    if precision != "autocast":
        raise ValueError(f"--precision {precision!r}: expected 'autocast' or 'full'")
    return torch.autocast(device.type, dtype=autocast_dtype(device))


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the CPU (fp16 is slow there), fp16 on CUDA and MPS, as `--precision autocast`."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def prepare_for_precision(model, precision: str, device: torch.device) -> None:
    """With autocast, hold the UNet's weights in its dtype once: autocast would otherwise cast
    every weight on every sampling step (most of a CPU step for SD, bench/README.md)."""
    if precision == "autocast":
        model.model.to(autocast_dtype(device))


def latent_factor(model) -> int:
    """How many pixels one latent spans per side: 2 ** (levels - 1) of the first stage."""
    return 2 ** (len(model.first_stage_model.encoder.down) - 1)


def read_prompts(prompt: str, from_file: str | None, batch_size: int) -> list[list[str]]:
    """Batches of prompts: `prompt` repeated batch_size times, or a file's lines in chunks."""
    if from_file is None:
        return [[prompt] * batch_size]
    path = Path(from_file)
    if not path.is_file():
        raise FileNotFoundError(f"--from-file {from_file}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--from-file {from_file}: no prompts in it (one per line)")
    return [lines[i : i + batch_size] for i in range(0, len(lines), batch_size)]


def next_index(directory: Path, pattern: str) -> int:
    """One past the files already in `directory` matching `pattern`: outputs never overwrite."""
    return len(list(directory.glob(pattern)))


def to_pil(images: torch.Tensor) -> Iterator[Image.Image]:
    """PIL images from (B, 3, H, W) in [-1, 1]."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
        yield Image.fromarray(np.ascontiguousarray(array))


def save_samples(images: torch.Tensor, directory: Path) -> list[Path]:
    """Each image as `directory/NNNNN.png`, numbered after those already there."""
    directory.mkdir(parents=True, exist_ok=True)
    start = next_index(directory, "[0-9][0-9][0-9][0-9][0-9].png")
    paths = []
    for i, image in enumerate(to_pil(images)):
        paths.append(directory / f"{start + i:05}.png")
        image.save(paths[-1])
    return paths


def save_grid(images: torch.Tensor, outdir: Path, n_rows: int) -> Path:
    """All images as one `outdir/grid-NNNN.png`, `n_rows` images per row, black between."""
    outdir.mkdir(parents=True, exist_ok=True)
    unit = (images.float().cpu().clamp(-1, 1) + 1) / 2
    grid = make_grid(unit, nrow=n_rows, padding=2)  # (3, H', W') in [0, 1]
    path = outdir / f"grid-{next_index(outdir, 'grid-*.png'):04}.png"
    next(to_pil(grid[None] * 2 - 1)).save(path)
    return path
