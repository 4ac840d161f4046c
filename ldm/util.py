"""Build objects from `target:` / `params:` configs, as the original Stable Diffusion code does."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from omegaconf import DictConfig, ListConfig, OmegaConf

# Config values the original repository uses in place of a `target:` to mean "no model here".
SENTINELS = ("__is_first_stage__", "__is_unconditional__")
# Keys allowed beside target/params: the original configs keep the base learning rate there.
EXTRA_KEYS = {"base_learning_rate"}


class ConfigError(ValueError):
    """A config that cannot be turned into an object; the message names the key and the target."""


# generative-models' package name, whose classes live here under `ldm.` at the same paths.
ALIASED_PACKAGE = "sgm."


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`; `sgm.X` (generative-models' released
    configs) is `ldm.X`, the one alias rule."""
    if string.startswith(ALIASED_PACKAGE):
        string = "ldm." + string.removeprefix(ALIASED_PACKAGE)
    module_name, _, attr = string.rpartition(".")
    if not module_name:
        raise ConfigError(f"target {string!r} is not a dotted path such as 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"target {string!r}: cannot import module {module_name!r} ({err})"
        ) from err
    if reload:
        module = importlib.reload(module)
    if not hasattr(module, attr):
        raise ConfigError(f"target {string!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def to_plain(value: Any) -> Any:
    """OmegaConf containers to plain dicts and lists (interpolations resolved); others unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def accepted_params(obj: Any) -> set[str] | None:
    """Keyword names `obj(...)` accepts, following `**kwargs` up a class's bases; None if open."""
    if not inspect.isclass(obj):
        return _named(inspect.signature(obj).parameters)
    names: set[str] = set()
    for cls in obj.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        names |= _named(params) - {"self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return names
    return None


def _named(params: Mapping[str, inspect.Parameter]) -> set[str]:
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {name for name, p in params.items() if p.kind not in variadic}


def check_params(target: str, obj: Any, params: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming `target` and each key that `obj`'s constructor does not accept."""
    try:
        accepted = accepted_params(obj)
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call itself decide
    unknown = sorted(set(params) - accepted) if accepted is not None else []
    if unknown:
        raise ConfigError(
            f"target {target!r} does not accept params {unknown}; it accepts: {sorted(accepted)}"
        )
    missing = [
        name
        for name, p in signature.parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in params
    ]
    if missing:
        raise ConfigError(f"target {target!r} needs params {missing}, which the config lacks")


def instantiate_from_config(config: Any) -> Any:
    """Return `target(**params)` for a `{target, params}` config; None for the SD sentinels."""
    if isinstance(config, str) and config in SENTINELS:
        return None
    config = to_plain(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"expected a mapping with a 'target' key, got {config!r}")
    if "target" not in config:
        raise ConfigError(f"config has no 'target' key (keys: {sorted(config)})")
    unknown = sorted(set(config) - {"target", "params"} - EXTRA_KEYS)
    if unknown:
        raise ConfigError(f"target {config['target']!r}: unexpected keys {unknown} beside 'params'")
    target = config["target"]
    params = config.get("params") or {}
    obj = get_obj_from_str(target)
    check_params(target, obj, params)
    return obj(**params)


def count_params(model: Any) -> int:
    """Number of parameters of an nn.Module."""
    return sum(p.numel() for p in model.parameters())


# Caption keys that stand in for each other: SD's configs say `txt`, our data sets `caption`.
KEY_ALIASES = {"txt": "caption", "caption": "txt"}


def batch_item(batch: Mapping, key: str) -> object:
    """`batch[key]` (or its alias), or an error naming the key and the keys the batch has."""
    if key not in batch and KEY_ALIASES.get(key) in batch:
        key = KEY_ALIASES[key]
    if key not in batch:
        raise KeyError(f"batch has no {key!r} entry (it has {sorted(batch)}); check the data keys")
    return batch[key]


def channels_first(images: torch.Tensor) -> torch.Tensor:
    """Batch images (B, H, W, C), or (B, H, W) as C = 1, as float contiguous (B, C, H, W)."""
    if images.ndim == 3:
        images = images[..., None]
    return rearrange(images, "b h w c -> b c h w").contiguous().float()


def to_dtype_of(module: torch.nn.Module, value: Any) -> Any:
    """`value` (a tensor, or a list or mapping of them) with its floating-point tensors in the
    dtype of `module`'s weights: what a module converted whole (`--precision bf16-true`, a
    half export) takes, from a batch's float images or the fp32 schedule's x_t."""
    weight = next(module.parameters(), None)
    if weight is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(weight.dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: to_dtype_of(module, v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_dtype_of(module, v) for v in value]
    return value


def make_optimizer(config: Mapping | None, params: list, lr: float):
    """AdamW at `lr` (fused where torch has the kernel: a few times faster than the per-tensor
    default for a many-tensor UNet), or the class `config` names (`target`, `params`) at `lr`.

    `params`: parameters, or parameter groups ({"params": [...], "lr": ...}) as torch takes them.
    """
    if config is None:
        tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
        fused = bool(tensors) and all(t.device.type in ("cpu", "cuda") for t in tensors)
        return torch.optim.AdamW(params, lr=lr, fused=fused or None)
    target = config.get("target") if isinstance(config, Mapping) else None
    if target is None:
        raise ConfigError(f"optimizer_config needs a 'target' such as torch.optim.AdamW: {config}")
    try:
        return get_obj_from_str(target)(params, lr=lr, **to_plain(config.get("params") or {}))
    except TypeError as err:
        raise ConfigError(f"optimizer_config {target!r}: {err}") from err


def reject_unsupported(where: str, options: Mapping[str, tuple[Any, Any]]) -> None:
    """Raise NotImplementedError naming each option set to a value this code does not support.

    `options` maps a name to (the value given, what is supported): one value, or a frozenset
    of them. None is supported only as None, and a tensor (a mask, an x0) never counts as the
    default.
    """

    def supported(value: Any, default: Any) -> bool:
        if isinstance(default, frozenset):
            return value in default
        if default is None or isinstance(value, torch.Tensor):
            return value is None
        return value == default

    def expected(default: Any) -> str:
        return (
            f"one of {sorted(default)}" if isinstance(default, frozenset) else f"only {default!r}"
        )

    bad = [f"{k}={v!r} ({expected(d)})" for k, (v, d) in options.items() if not supported(v, d)]
    if bad:
        raise NotImplementedError(f"{where}: {', '.join(bad)} not supported")
