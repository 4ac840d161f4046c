"""Load a model for sampling or export.

A model comes from a checkpoint (a `main.py` `.ckpt`, an original SD `.ckpt` / `.safetensors`,
or a diffusers folder) and a config; a `main.py` log dir (or a checkpoint inside one) brings its own
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
    is_adapter_checkpoint,
    is_diffusers_folder,
    load_weights,
    read_state_dict,
    run_files,
    swap_in_ema,
)
from ldm.models.diffusion.ddpm import DDPM
from ldm.util import get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)


def inference_config(configs: Sequence[str | os.PathLike], keep_base: bool = False) -> DictConfig:
    """The merged config, set up to build a model whose weights all come from one file, or
    with `keep_base`, from its ckpt_path and the file (a LoRA run's adapter checkpoint)."""
    config = OmegaConf.merge(*(OmegaConf.load(c) for c in configs))
    if "model" not in config:
        raise CheckpointError(f"config {[str(c) for c in configs]} has no 'model' section")
    params = config.model.setdefault("params", {})
    if not keep_base:
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
    """(model in eval mode on `device`, config) from a checkpoint, `main.py` log dir or
    diffusers folder (`ldm.diffusers_layout`; it needs `config`).

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
    if is_diffusers_folder(ckpt):  # converted for the model the config builds; no EMA copy
        model = instantiate_from_config(config.model)
        model.init_from_ckpt(ckpt, unsafe_pickle=unsafe_pickle)
        return model.to(device).eval(), config
    state_dict = read_state_dict(ckpt, unsafe_pickle=unsafe_pickle)
    if use_ema:
        state_dict, swapped = swap_in_ema(state_dict)
        logger.info("%s: using %s weights", ckpt, "EMA" if swapped else "its (no EMA copy)")
    if is_adapter_checkpoint(state_dict):
        model, config = adapter_run_model(ckpt, configs, state_dict)
        return model.to(device).eval(), config
    try:
        with torch.device("meta"):  # check the keys before building the real thing
            fitting_state_dict(instantiate_from_config(config.model), state_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{ckpt} with config {[str(c) for c in configs]}: {err}") from err
    model = instantiate_from_config(config.model)
    load_weights(model, state_dict)
    return model.to(device).eval(), config


def adapter_run_model(ckpt, configs: list, state_dict: dict) -> tuple[torch.nn.Module, DictConfig]:
    """(model, config) of a LoRA run: the base its config names (ckpt_path), the adapters
    from `state_dict` (`ckpt`'s, its EMA already swapped in or not)."""
    config = inference_config(configs, keep_base=True)
    if "lora_config" not in config.model.params:
        raise CheckpointError(f"{ckpt} holds LoRA adapters, but its config has no lora_config")
    if config.model.params.get("ckpt_path") is None:
        logger.warning("%s: its config names no base (ckpt_path): the base is the run seed's", ckpt)
    model = instantiate_from_config(config.model)
    load_weights(model, {**model.state_dict(), **state_dict})  # an EMA copy is left out
    return model, config


def latent_factor(model) -> int:
    """How many pixels one latent spans per side: 2 ** (levels - 1) of the first stage."""
    return 2 ** (len(model.first_stage_model.encoder.down) - 1)
