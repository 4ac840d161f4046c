"""Load a model for sampling or export.

A model comes from a checkpoint (a `main.py` `.ckpt`, or an original SD `.ckpt` /
`.safetensors`) and a config; a `main.py` log dir (or a checkpoint inside one) brings its own
saved config. EMA weights, when the file has them, are swapped into the UNet's. The command
lines' own helpers (flags, devices, precision, saving images) are in `scripts/common.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import (
    CheckpointError,
    fitting_state_dict,
    load_weights,
    read_state_dict,
    run_files,
    swap_in_ema,
)
from ldm.models.diffusion.ddpm import DDPM
from ldm.util import get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)


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
