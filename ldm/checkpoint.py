"""Read and write checkpoints in the original Stable Diffusion layout (.ckpt and .safetensors)."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.util import instantiate_from_config

# Keys that original SD files carry and current libraries no longer keep in their state dicts.
LEGACY_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
EMA_PREFIX = "model_ema."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the keys."""


def read_state_dict(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> dict:
    """The flat tensor dict of a .safetensors or .ckpt file (its "state_dict" when nested)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds pickled objects beyond tensors, which weights_only loading refuses. "
            "If you trust the file, load it with unsafe_pickle=True (full unpickling runs code), "
            f"or convert it to .safetensors. Detail: {err}"
        ) from err
    state_dict = data.get("state_dict", data) if isinstance(data, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors or a dict with 'state_dict'")
    return dict(state_dict)


def filter_keys(state_dict: Mapping, ignore_prefixes: Iterable[str] = ()) -> dict:
    """Drop keys that start with any of `ignore_prefixes`."""
    prefixes = tuple(ignore_prefixes)
    return {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}


def describe_mismatch(module: nn.Module, state_dict: Mapping) -> tuple[list, list, list]:
    """(missing, unexpected, wrong-shape) keys of `state_dict` against `module.state_dict()`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    return missing, unexpected, wrong_shape


def _listing(title: str, keys: list, limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {', '.join(keys[:limit])}{more}"


def fitting_state_dict(
    module: nn.Module, state_dict: Mapping, *, strict: bool = True, name: str = "state dict"
) -> tuple[dict, list, list]:
    """(the entries of `state_dict` that `module` takes, missing keys, unexpected keys).

    Shape mismatches are always an error. With `strict`, missing and unexpected keys are too.
    Keys the original files carry that the module has no place for are dropped quietly:
    LEGACY_KEYS, and the `model_ema.*` copy when the module keeps no EMA. Only shapes are
    read from `module`, so a module on the meta device checks a file without loading it.
    """
    expected = module.state_dict()
    has_ema = any(k.startswith(EMA_PREFIX) for k in expected)
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if k in expected or not (k in LEGACY_KEYS or (k.startswith(EMA_PREFIX) and not has_ema))
    }
    missing, unexpected, wrong_shape = describe_mismatch(module, state_dict)
    problems = [_listing("wrong shape", wrong_shape)] if wrong_shape else []
    if strict:
        problems += [_listing("missing", missing)] if missing else []
        problems += [_listing("unexpected", unexpected)] if unexpected else []
    if problems:
        raise CheckpointError(
            f"{name} does not fit {type(module).__name__}: " + "; ".join(problems)
        )
    return {k: v for k, v in state_dict.items() if k in expected}, missing, unexpected


def load_weights(
    module: nn.Module,
    source: str | os.PathLike | Mapping,
    *,
    ignore_keys: Iterable[str] = (),
    strict: bool = True,
    unsafe_pickle: bool = False,
) -> tuple[list, list]:
    """Load a file or state dict into a fully built `module`; report bad keys by name.

    The checks are `fitting_state_dict`'s. Returns (missing, unexpected) keys.
    """
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    state_dict = (
        source
        if isinstance(source, Mapping)
        else read_state_dict(source, unsafe_pickle=unsafe_pickle)
    )
    state_dict = filter_keys(state_dict, ignore_keys)
    fitting, missing, unexpected = fitting_state_dict(module, state_dict, strict=strict, name=name)
    module.load_state_dict(fitting, strict=False)
    return missing, unexpected


def save_checkpoint(
    state_dict: Mapping, path: str | os.PathLike, *, extra: Mapping | None = None
) -> None:
    """Write `state_dict` atomically: flat for .safetensors, under "state_dict" for .ckpt."""
    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        metadata = {k: str(v) for k, v in (extra or {}).items()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        checkpoint = {"state_dict": tensors, **(extra or {})}
        write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it onto `path`: a crash or a
    full disk mid-write leaves any previous file at `path` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_run(logdir: str | os.PathLike, ckpt: str | os.PathLike | None = None):
    """(model, config) of a `main.py` run: its saved config, weights from `ckpt` or last.ckpt."""
    logdir = Path(logdir)
    configs = sorted((logdir / "configs").glob("*-project.yaml"))
    if not configs:
        raise CheckpointError(f"{logdir} has no configs/*-project.yaml; is it a main.py log dir?")
    ckpt = Path(ckpt) if ckpt else logdir / "checkpoints" / "last.ckpt"
    config = OmegaConf.merge(*(OmegaConf.load(c) for c in configs))
    params = config.model.params
    params.ckpt_path = None  # the run's own weights come from `ckpt`, below
    if "first_stage_config" in params:
        params.first_stage_config.params.ckpt_path = None
    model = instantiate_from_config(config.model)
    load_weights(model, ckpt)
    return model.eval(), config
