"""Export a trained model as one original-layout Stable Diffusion file.

    python scripts/convert.py --ckpt logs/<run> --out model.safetensors --use_ema --drop_ema --half
    python scripts/convert.py --ckpt sd-v1-4.ckpt --out sd-v1-4.safetensors --unsafe_pickle
    python scripts/convert.py --ckpt sd-v1-5/ --config configs/stable-diffusion/v1-inference.yaml \
        --out sd-v1-5.safetensors
    python scripts/convert.py --ckpt logs/<lora run> --adapter --use_ema --out my-lora.safetensors
    python scripts/convert.py --ckpt logs/<lora run> --use_ema --out merged.safetensors
    python scripts/convert.py --ckpt sd-v1-5.safetensors --config <its yaml> \
        --lora style.safetensors:0.8 --out sd-v1-5-style.safetensors

The result has the key layout of the original SD `.ckpt` / `.safetensors` files, which
diffusers' single-file loader, ComfyUI and AUTOMATIC1111 read: `.safetensors` is flat, `.ckpt`
holds the tensors under "state_dict". A diffusers folder (unet/, vae/, text_encoder/) is loaded
into the model of --config and written with that model's schedule buffers. Training state
(optimizer, schedulers, RNG) is left out. A LoRA run's checkpoint holds only its adapters:
`--adapter` writes them in the kohya layout (`lora_unet_...`, `.lora_down.weight`,
`.lora_up.weight`, `.alpha`) that AUTOMATIC1111, ComfyUI and diffusers' `load_lora_weights`
read; without it they are merged into the run's base, as `--lora FILE[:SCALE]` files are.
When a config is known (a log dir's own, or --config) the file is checked key for key against
the model it describes before it is written. `--half` rounds the weights to fp16 but keeps the
schedule buffers (betas, alphas_cumprod, posterior_*...) in fp32, so sampling is unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm import inference  # noqa: E402
from ldm.checkpoint import (  # noqa: E402
    EMA_PREFIX,
    LORA_PREFIX,
    UNSAFE_PICKLE_FLAG,
    CheckpointError,
    filter_keys,
    fitting_state_dict,
    is_adapter_checkpoint,
    is_diffusers_folder,
    read_state_dict,
    run_files,
    save_checkpoint,
    swap_in_ema,
)
from ldm.models.diffusion.adapters import merged_state_dict  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from scripts.common import add_lora_arg, merge_lora_files  # noqa: E402

SUFFIXES = (".safetensors", ".ckpt")
# Scalars that are no weights and that fp16 would change: LitEma's decay 0.9999 rounds to 1.
# LatentDiffusion's own buffers (keys without a dot: the noise schedule) are kept too.
FULL_PRECISION_KEYS = (EMA_PREFIX + "decay",)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add(
        "--ckpt",
        required=True,
        help="a main.py log dir, a .ckpt / .safetensors, or a diffusers folder",
    )
    add("--out", required=True, help="file to write: .safetensors or .ckpt")
    add("--config", nargs="+", help="config to check the file against (default: the log dir's)")
    add("--use_ema", action="store_true", help="put the EMA weights in place of the raw ones")
    add("--drop_ema", action="store_true", help="leave out the model_ema.* copy")
    add("--half", action="store_true", help="store the weights as fp16 (the schedule stays fp32)")
    add(
        "--adapter",
        action="store_true",
        help="a LoRA run: write its adapters alone, in the kohya / AUTOMATIC1111 LoRA layout",
    )
    add_lora_arg(parser)
    add(
        UNSAFE_PICKLE_FLAG,
        action="store_true",
        help="unpickle objects in a .ckpt (runs their code: only for files you trust)",
    )
    return parser


def exported(state_dict: dict, use_ema: bool, drop_ema: bool, half: bool) -> dict:
    """The state dict as the options ask: EMA swapped in or dropped, fp16 or as it was."""
    if use_ema:
        state_dict, has_ema = swap_in_ema(state_dict)
        if not has_ema:
            raise CheckpointError("--use_ema: the checkpoint has no model_ema.* weights")
    elif drop_ema:
        state_dict = filter_keys(state_dict, [EMA_PREFIX])
    if half:
        state_dict = {k: v.half() if is_weight(k, v) else v for k, v in state_dict.items()}
    return state_dict


def is_weight(key: str, value) -> bool:
    """Whether --half rounds `key`: floating-point, not a schedule buffer, not the EMA decay."""
    return value.is_floating_point() and "." in key and key not in FULL_PRECISION_KEYS


def read_checkpoint(ckpt: Path, configs: list, unsafe_pickle: bool) -> dict:
    """The state dict of a checkpoint file; of a diffusers folder, that of the config's model
    loaded from it (schedule buffers included, as in original SD files)."""
    if not is_diffusers_folder(ckpt):
        return read_state_dict(ckpt, unsafe_pickle=unsafe_pickle)
    if not configs:
        raise CheckpointError(
            f"--ckpt {ckpt} is a diffusers folder: give --config, the YAML of its model"
        )
    model, _ = inference.load_model(ckpt, configs, unsafe_pickle=unsafe_pickle)
    return model.state_dict()


def adapter_file(state_dict: dict, use_ema: bool, half: bool) -> dict:
    """A LoRA run's adapters (the EMA's with use_ema) as a kohya LoRA file."""
    if not is_adapter_checkpoint(state_dict):
        raise CheckpointError("--adapter: the checkpoint holds no LoRA adapters (lora.*)")
    state_dict = exported(state_dict, use_ema, drop_ema=True, half=half)
    return {
        k.removeprefix(LORA_PREFIX): v for k, v in state_dict.items() if k.startswith(LORA_PREFIX)
    }


def merged(ckpt: Path, configs: list, opt) -> dict:
    """The model of a LoRA run (its base and adapters) or of a file, with its adapters and the
    --lora files merged into the weights: one original-layout state dict."""
    if not configs:
        raise CheckpointError(f"{ckpt}: merging LoRA adapters needs the model's --config")
    model, _ = inference.load_model(
        ckpt, configs, use_ema=opt.use_ema, unsafe_pickle=opt.unsafe_pickle
    )
    merge_lora_files(model, opt.lora)
    return merged_state_dict(model)


def export_state_dict(opt, ckpt: Path, configs: list) -> dict:
    """What --out gets, checked against the config when there is one."""
    state_dict = read_checkpoint(ckpt, configs, opt.unsafe_pickle)
    if opt.adapter:
        return adapter_file(state_dict, opt.use_ema, opt.half)
    merging = bool(opt.lora) or is_adapter_checkpoint(state_dict)
    if merging:
        state_dict = merged(ckpt, configs, opt)
    state_dict = exported(state_dict, opt.use_ema and not merging, opt.drop_ema, opt.half)
    if configs:
        check_against(configs, state_dict)
    return state_dict


def check_against(config_paths: list, state_dict: dict) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the keys and shapes of the model
    (the model without adapters: an export has them merged)."""
    config = inference.inference_config(config_paths)
    config.model.params.pop("lora_config", None)
    if "use_ema" in config.model.params:
        config.model.params.use_ema = any(k.startswith(EMA_PREFIX) for k in state_dict)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    fitting_state_dict(model, state_dict, name=f"the export, against config {config_paths},")


def main(argv: list[str] | None = None) -> dict:
    opt = get_parser().parse_args(argv)
    out = Path(opt.out)
    if out.suffix not in SUFFIXES:
        sys.exit(f"convert.py: --out {out}: expected a {' or '.join(SUFFIXES)} file name")
    try:
        run_configs, ckpt = run_files(opt.ckpt)
        configs = opt.config or run_configs
        state_dict = export_state_dict(opt, ckpt, configs)
    except (OSError, ValueError, RuntimeError) as err:
        sys.exit(f"convert.py: {err}")
    save_checkpoint(state_dict, out)
    summary = {
        "out": str(out),
        "from": str(ckpt),
        "tensors": len(state_dict),
        "ema": "swapped in" if opt.use_ema else "dropped" if opt.drop_ema else "kept as is",
        "layout": "kohya LoRA" if opt.adapter else "original SD",
        "merged_lora": [f"{path}:{scale}" for path, scale in opt.lora],
        "dtype": "fp16 weights" if opt.half else "as trained",
        "checked": [str(c) for c in configs],
        "megabytes": round(out.stat().st_size / 2**20, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
