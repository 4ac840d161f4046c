"""Files on disk: checkpoints in the original Stable Diffusion layout (.ckpt and .safetensors),
the EMA key rule, and the layout of a `main.py` run dir."""

from __future__ import annotations

import os
import pickle
import re
import secrets
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

# Keys that original SD files carry and current libraries no longer keep in their state dicts.
LEGACY_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
EMA_PREFIX = "model_ema."  # LitEma's buffers in a LatentDiffusion state dict
MODEL_PREFIX = "model."  # the weights LitEma tracks (DiffusionWrapper's)...
LORA_PREFIX = "lora."  # ...or, in a LoRA fine-tune, the adapters' (kohya names below it)
# The command-line flag of every entry point that passes unsafe_pickle=True; errors name it.
UNSAFE_PICKLE_FLAG = "--unsafe_pickle"
# How torch's weights-only unpickler names the class or function it refused to import.
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the keys."""


def read_state_dict(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> dict:
    """The flat tensor dict of a .safetensors or .ckpt file (its "state_dict" when nested)."""
    path = Path(path)
    if is_diffusers_folder(path):
        raise CheckpointError(
            f"{path} is a diffusers folder: its weights are converted for the model they go "
            "into (ldm.diffusers_layout.read_weights(path, model))"
        )
    if is_sharded_checkpoint(path):
        return read_sharded_state_dict(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as err:
            raise CheckpointError(
                f"{path} is truncated or corrupt: not a readable .safetensors file ({err})"
            ) from err
    data = load_torch_file(path, unsafe_pickle=unsafe_pickle)
    state_dict = data.get("state_dict", data) if isinstance(data, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors or a dict with 'state_dict'")
    return dict(state_dict)


# What Lightning's FSDPStrategy(state_dict_type="sharded") writes in place of a .ckpt file: a
# directory of torch.distributed.checkpoint shards ("model", "optimizer_0", ...) and the rest of
# the checkpoint (step, callbacks, loops) in meta.pt.
SHARDED_META = "meta.pt"
SHARDED_MODEL_KEY = "model"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a sharded checkpoint directory (FSDP's `<name>.ckpt/`)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint: a file, or a sharded checkpoint directory."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


def saved_at(path: str | os.PathLike) -> int:
    """When a checkpoint was last written (ns): its file's, or a sharded one's meta.pt's, which
    Lightning writes after the shards."""
    path = Path(path)
    return (path / SHARDED_META if path.is_dir() else path).stat().st_mtime_ns


def read_sharded_state_dict(path: str | os.PathLike) -> dict:
    """The whole model state dict of a sharded checkpoint, read into this one process (the
    optimizer's shards are not read). Keys are the LightningModule's: the original SD layout."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    try:  # what dcp_to_torch_save reads, the "model" entry alone, without a process group
        state = _load_state_dict_from_keys({SHARDED_MODEL_KEY}, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:  # the latter is no Exception
        raise CheckpointError(f"{path}: not a readable sharded checkpoint ({err})") from err
    if not isinstance(state.get(SHARDED_MODEL_KEY), Mapping):
        raise CheckpointError(f"{path}: the sharded checkpoint has no {SHARDED_MODEL_KEY!r} entry")
    return dict(state[SHARDED_MODEL_KEY])


# The subfolders of a diffusers pipeline that hold SD's networks (diffusers' own names).
DIFFUSERS_SUBFOLDERS = ("unet", "vae", "text_encoder")


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory as diffusers saves one: a pipeline (model_index.json, or
    unet/, vae/, text_encoder/ with a config.json) or a single model (a config.json on top)."""
    path = Path(path)
    if not path.is_dir():
        return False
    configs = [path / "config.json", *(path / sub / "config.json" for sub in DIFFUSERS_SUBFOLDERS)]
    return (path / "model_index.json").is_file() or any(c.is_file() for c in configs)


def load_torch_file(
    path: str | os.PathLike, *, unsafe_pickle: bool = False, map_location=None
) -> object:
    """`torch.load` of a .ckpt (weights only unless `unsafe_pickle`, onto the CPU by default);
    a file it cannot read raises a one-line CheckpointError that names it and what is wrong."""
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=not unsafe_pickle)
    except Exception as err:  # torch reports a bad file as any of a dozen exception types
        raise unreadable(path, err) from err


def unreadable(path: str | os.PathLike, err: Exception) -> CheckpointError:
    """The CheckpointError for `torch.load(path)` failing with `err`."""
    lines = str(err).strip().splitlines()
    detail = f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__
    refused = REFUSED_GLOBAL.search(str(err))
    if isinstance(err, pickle.UnpicklingError) and refused:
        return CheckpointError(
            f"{path} holds pickled Python objects ({refused[1]}), which are not loaded by "
            f"default because unpickling runs code; if you trust the file, pass "
            f"{UNSAFE_PICKLE_FLAG} (unsafe_pickle=True from Python), or convert it once with "
            f"scripts/convert.py {UNSAFE_PICKLE_FLAG} --out <name>.safetensors"
        )
    if isinstance(err, FileNotFoundError):
        return CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if isinstance(err, PermissionError | IsADirectoryError):
        return CheckpointError(f"{path} cannot be read ({detail})")
    if isinstance(err, ImportError | AttributeError):  # full unpickling of a foreign file
        return CheckpointError(f"{path}: its pickled objects need code not found here ({detail})")
    return CheckpointError(f"{path} is truncated or corrupt: not a readable torch file ({detail})")


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


def count_by_prefix(keys: Iterable[str]) -> str:
    """How many keys fall under each top-level name, e.g. "first_stage_model.: 120, model.: 300"."""
    counts = Counter(k.split(".", 1)[0] + "." if "." in k else k for k in keys)
    return ", ".join(f"{prefix}: {n}" for prefix, n in sorted(counts.items()))


UNET_PREFIX = "model.diffusion_model."  # the UNet's keys in an original SD file
ORIGINAL_LAYOUT = (
    "the original Stable Diffusion layout of this config (model.diffusion_model.*, "
    "first_stage_model.*, cond_stage_model.*); ignore_keys: [prefix, ...] keeps weights "
    "under those prefixes as built, load_only_unet: true takes only the UNet"
)


def unet_weights(state_dict: Mapping) -> dict:
    """A file's UNet weights keyed as DiffusionWrapper's (`diffusion_model.*`): the
    `model.diffusion_model.*` entries of a full SD file, or a bare UNet file as it is."""
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        return dict(state_dict)
    start = len(UNET_PREFIX) - len("diffusion_model.")
    return {k[start:]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}


# What a file's keys say about where it comes from, for errors about a file that does not fit.
# Fragments are matched anywhere in a key (diffusers' VAE keys are "encoder.down_blocks...").
LAYOUTS = (
    ("model.diffusion_model.", "an original Stable Diffusion file"),
    ("down_blocks.", "a diffusers-format model (diffusers' own key layout)"),
    ("mid_block.", "a diffusers-format model (diffusers' own key layout)"),
    ("diffusion_model.", "a bare UNet (diffusion_model.*, what load_only_unet takes)"),
    ("decoder.", "an autoencoder (encoder.* / decoder.*, e.g. AutoencoderKL's own file)"),
    ("text_model.", "a text encoder alone"),
)
DIFFUSERS_HINT = (
    "give the diffusers folder itself (the directory with unet/, vae/, text_encoder/), not a "
    "file in it: the folder is converted to the original layout as it loads"
)


def describe_layout(keys: Iterable[str]) -> str:
    """Where a state dict with these keys comes from, in words (LAYOUTS), for error messages."""
    keys = list(keys)
    for fragment, description in LAYOUTS:
        if any(fragment in k for k in keys):
            hint = f"; {DIFFUSERS_HINT}" if "diffusers" in description else ""
            return description + hint
    return f"an unknown layout (first keys: {', '.join(keys[:3])})"


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


def load_strictly(
    module: nn.Module,
    state_dict: Mapping,
    name: str,
    optional: Iterable[str] = (),
    expected_layout: str = "",
) -> set[str]:
    """Load `state_dict` into `module`; returns the keys loaded.

    Every key of the module must come from `state_dict`, except those starting with one of the
    `optional` prefixes (what the module can compute or restart itself), and every entry must
    fit the module (`fitting_state_dict`'s quiet drops aside). Otherwise a CheckpointError
    names the first missing and unexpected keys with their counts, what the file looks like
    and what was expected.
    """
    fitting, missing, unexpected = fitting_state_dict(module, state_dict, strict=False, name=name)
    missing = [k for k in missing if not k.startswith(tuple(optional))]
    if missing or unexpected:
        listed = {"missing": missing, "unexpected": unexpected}
        problems = [
            f"{_listing(title, keys, 5)} [{count_by_prefix(keys)}]"
            for title, keys in listed.items()
            if keys
        ]
        raise CheckpointError(
            f"{name} does not fit the {type(module).__name__} of this config: "
            f"{'; '.join(problems)}. The file looks like {describe_layout(state_dict)}"
            + (f"; expected {expected_layout}" if expected_layout else "")
        )
    module.load_state_dict(fitting, strict=False)
    return set(fitting)


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
    full disk mid-write leaves any previous file at `path` intact. The file gets the permissions
    `open()` would give it (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temporary_file(path)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with a 0o600 one
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def new_temporary_file(path: Path) -> str:
    """A new, empty `.{name}.<random>.tmp` beside `path`, created as `open()` creates files:
    mode 0o666 less the umask (tempfile.mkstemp's 0o600 would hide a team's checkpoints)."""
    while True:
        tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp"))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # another writer drew the same name: draw again
            continue


def ema_buffer_name(name: str) -> str:
    """LitEma's buffer name for the parameter `name` of the module it tracks: the name without
    dots, as in the original (`diffusion_model.out.2.weight` -> `diffusion_modelout2weight`)."""
    return name.replace(".", "")


def ema_key(key: str) -> str:
    """The state-dict key of the EMA copy of the `model.*` (or `lora.*`) weight `key`."""
    module_key = key.removeprefix(LORA_PREFIX if key.startswith(LORA_PREFIX) else MODEL_PREFIX)
    return EMA_PREFIX + ema_buffer_name(module_key)


def is_adapter_checkpoint(state_dict: Mapping) -> bool:
    """Whether a state dict is a LoRA run's: adapters (`lora.*`), and no base weights."""
    keys = list(state_dict)
    has_base = any(k.startswith(MODEL_PREFIX) for k in keys)
    return not has_base and any(k.startswith(LORA_PREFIX) for k in keys)


def swap_in_ema(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, bool]:
    """(state dict with the EMA copy in place of the weights it follows and no `model_ema.*`,
    whether there was an EMA copy to swap in)."""
    has_ema = any(k.startswith(EMA_PREFIX) for k in state_dict)
    swapped = {
        k: state_dict.get(ema_key(k), v) if k.startswith((MODEL_PREFIX, LORA_PREFIX)) else v
        for k, v in filter_keys(state_dict, [EMA_PREFIX]).items()
    }
    return swapped, has_ema


# The layout of a `main.py` run dir: SetupCallback and the checkpoint callbacks write it, the
# loaders and `-r` read it.
#   <logdir>/configs/<now>-project.yaml     the merged config (what builds the model)
#   <logdir>/configs/<now>-lightning.yaml   the `lightning:` section
#   <logdir>/checkpoints/last.ckpt          the latest weights
#   <logdir>/checkpoints/epoch=000001-step=000000120.ckpt   the last K steps' (STEP_CHECKPOINT)
#   <logdir>/checkpoints/best-epoch=...-step=....ckpt       the best K by the model's monitor
CONFIG_DIR = "configs"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
STEP_CHECKPOINT = "{epoch:06}-{step:09}"  # ModelCheckpoint's filename; it inserts "epoch="
BEST_CHECKPOINT = f"best-{STEP_CHECKPOINT}"
PROJECT_CONFIG = "-project.yaml"
LIGHTNING_CONFIG = "-lightning.yaml"


def config_dir(logdir: str | os.PathLike) -> Path:
    """Where a run keeps its saved configs."""
    return Path(logdir) / CONFIG_DIR


def checkpoint_dir(logdir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(logdir) / CHECKPOINT_DIR


def last_checkpoint(logdir: str | os.PathLike) -> Path:
    """A run's latest checkpoint, `-r`'s default."""
    return checkpoint_dir(logdir) / LAST_CHECKPOINT


def step_checkpoints(logdir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of a run's step checkpoints (not last or best ones), by step."""
    found = checkpoint_dir(logdir).glob("epoch=*-step=*.ckpt")
    return sorted((int(path.stem.rsplit("step=", 1)[1]), path) for path in found)


def config_names(now: str) -> tuple[str, str]:
    """(project, lightning) config file names of the run started at `now`."""
    return f"{now}{PROJECT_CONFIG}", f"{now}{LIGHTNING_CONFIG}"


def run_configs(logdir: str | os.PathLike) -> list[Path]:
    """A run's saved project configs, oldest first (a resumed run adds one): what builds its
    model when merged in this order."""
    return sorted(config_dir(logdir).glob(f"*{PROJECT_CONFIG}"))


def saved_configs(logdir: str | os.PathLike) -> list[Path]:
    """Every config a run saved, project and lightning, sorted by name: what `-r` merges."""
    return sorted(config_dir(logdir).glob("*.yaml"))


def run_files(path: str | os.PathLike) -> tuple[list[Path], Path]:
    """(saved configs, checkpoint) of a `main.py` log dir, or of a checkpoint inside one.

    The config list is empty when `path` is a checkpoint outside any log dir or a diffusers
    folder.
    """
    path = Path(path)
    if is_diffusers_folder(path):  # weights only; the caller gives the config
        return [], path
    if path.is_dir() and not is_sharded_checkpoint(path):
        configs = run_configs(path)
        if not configs:
            raise CheckpointError(
                f"{path} is a directory without {CONFIG_DIR}/*{PROJECT_CONFIG}; "
                "is it a main.py log dir (or a diffusers folder: model_index.json, unet/...)?"
            )
        return configs, last_checkpoint(path)
    if path.parent.name == CHECKPOINT_DIR:
        return run_configs(path.parent.parent), path
    return [], path
