"""LoRA on a LatentDiffusion model: `model.params.lora_config`, and LoRA files in and out.

    lora_config:
      unet: {rank: 8, alpha: 8, dropout: 0.0, targets: [attn, ff, proj], learning_rate: 1.0e-4}
      text_encoder: {rank: 4, targets: [attn, mlp], learning_rate: 5.0e-5}

Targets are groups of layers (`lora.UNET_TARGETS`, `lora.TEXT_ENCODER_TARGETS`); `conv` adds
LoCon adapters on the ResBlocks' and resamplers' convolutions. alpha defaults to the rank
(scale 1); a part's learning_rate, when given, is its own and not scaled by --scale_lr.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ldm.checkpoint import LORA_PREFIX, CheckpointError, read_state_dict
from ldm.diffusers_layout import unet_module_names
from ldm.modules import lora
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.modules.lora import AttentionSlot, LoRAModule, LoRANetwork
from ldm.util import ConfigError, to_plain

logger = logging.getLogger(__name__)

PARTS = {"unet": lora.UNET_TARGETS, "text_encoder": lora.TEXT_ENCODER_TARGETS}
DEFAULT_TARGETS = {"unet": ("attn", "ff", "proj"), "text_encoder": ("attn", "mlp")}


@dataclass(frozen=True)
class AdapterSpec:
    """One part's adapters: rank, alpha (default: the rank), dropout, targets, learning rate."""

    part: str
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    learning_rate: float | None = None

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def parse_lora_config(config: Mapping | None) -> dict[str, AdapterSpec]:
    """{part: AdapterSpec} of `lora_config`, every key checked."""
    config = to_plain(config or {})
    unknown = sorted(set(config) - set(PARTS))
    if unknown or not config:
        raise ConfigError(f"lora_config {unknown or '{}'}: expected parts among {sorted(PARTS)}")
    specs = {}
    for part, options in config.items():
        options = dict(options or {})
        allowed = {f.name for f in fields(AdapterSpec)} - {"part"}
        if bad := sorted(set(options) - allowed):
            raise ConfigError(f"lora_config.{part}: unknown keys {bad}; expected {sorted(allowed)}")
        options["targets"] = tuple(options.get("targets") or DEFAULT_TARGETS[part])
        spec = AdapterSpec(part=part, **options)
        if not isinstance(spec.rank, int) or spec.rank < 1:
            raise ConfigError(f"lora_config.{part}.rank {spec.rank!r}: expected an integer >= 1")
        specs[part] = spec
    return specs


def text_encoders(model) -> list[tuple[str, nn.Module]]:
    """(kohya prefix, embedder) of each text encoder: SD's condition stage (`lora_te_`), or
    SDXL's text embedders in the conditioner's order (`lora_te1_`, `lora_te2_`, as kohya)."""
    conditioner = getattr(model, "conditioner", None)
    if conditioner is None:
        return (
            []
            if model.cond_stage_model is None
            else [(lora.TEXT_ENCODER_PREFIX, model.cond_stage_model)]
        )
    embedders = [conditioner.embedders[i] for i in conditioner.text_embedders()]
    if len(embedders) == 1:
        return [(lora.TEXT_ENCODER_PREFIX, embedders[0])]
    return [(f"lora_te{n}_", embedder) for n, embedder in enumerate(embedders, start=1)]


def part_layers(model, part: str, targets) -> dict[str, nn.Module | AttentionSlot]:
    """{kohya name: layer} of one part of a LatentDiffusion model, for the named targets.
    kohya names SD's UNet layers as diffusers does and SDXL's by the original layout
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`)."""
    pattern = lora.targets_of(targets, PARTS[part], f"lora_config.{part}")
    if part == "unet":
        unet = model.model.diffusion_model
        names = None if hasattr(model, "conditioner") else unet_module_names(unet)
        return lora.adaptable_layers(unet, pattern, names, lora.UNET_PREFIX)
    layers = {}
    for prefix, embedder in text_encoders(model):
        if isinstance(embedder, FrozenOpenCLIPEmbedder):
            layers |= open_clip_layers(embedder, targets, prefix)
        else:
            layers |= lora.adaptable_layers(text_model(embedder), pattern, None, prefix)
    return layers


def text_model(embedder: nn.Module) -> nn.Module:
    """The transformers CLIPTextModel of a text encoder (`text_model.*` inside)."""
    transformer = getattr(embedder, "transformer", None)
    if transformer is None or not hasattr(transformer, "text_model"):
        raise NotImplementedError(
            f"text-encoder LoRA needs a CLIP text encoder (FrozenCLIPEmbedder or "
            f"FrozenOpenCLIPEmbedder); {type(embedder).__name__} is neither"
        )
    return transformer


def open_clip_layers(embedder: FrozenOpenCLIPEmbedder, targets, prefix: str) -> dict:
    """{kohya name: layer} of an OpenCLIP text tower, named as kohya names its transformers
    conversion (`..._encoder_layers_0_self_attn_q_proj`, `..._mlp_fc1`); blocks after the one
    the embedder conditions on are left out (they would never get a gradient), unless its
    pooled output (SDXL's) comes from the last one."""
    blocks = embedder.model.transformer.resblocks
    used = (
        len(blocks)
        if getattr(embedder, "return_pooled", False)
        else len(blocks) - embedder.layer_idx
    )
    layers = {}
    for i, block in enumerate(blocks[:used]):
        stem = f"{prefix}text_model_encoder_layers_{i}_"
        if "attn" in targets:
            for part in AttentionSlot.PARTS:
                layers[f"{stem}self_attn_{part}_proj"] = AttentionSlot(block.attn, part)
        if "mlp" in targets:
            layers[f"{stem}mlp_fc1"], layers[f"{stem}mlp_fc2"] = block.mlp.c_fc, block.mlp.c_proj
    return layers


def check_rank(name: str, layer: nn.Module, rank: int) -> None:
    """A rank above the layer's narrower side adds parameters and no expressiveness."""
    width = min(layer.weight.shape[0], layer.weight[0].numel())
    if rank > width:
        raise ConfigError(
            f"lora_config rank {rank} is larger than {name}'s {tuple(layer.weight.shape)} "
            f"weight allows (at most {width})"
        )


def build_lora(model, config: Mapping) -> tuple[LoRANetwork, dict[str, AdapterSpec]]:
    """The adapters `lora_config` asks for, hooked into the model's layers."""
    specs = parse_lora_config(config)
    adapters, layers = {}, {}
    for part, spec in specs.items():
        found = part_layers(model, part, spec.targets)
        if not found:
            raise ConfigError(f"lora_config.{part}.targets {list(spec.targets)} match no layer")
        for name, layer in found.items():
            check_rank(name, layer, spec.rank)
            if isinstance(layer, AttentionSlot) and spec.dropout:
                raise ConfigError(
                    f"lora_config.{part}.dropout {spec.dropout}: OpenCLIP's attention adapters "
                    "update the fused q/k/v weights and take no dropout; set it to 0"
                )
            adapters[name] = LoRAModule(layer, spec.rank, spec.scale_alpha, spec.dropout)
        layers.update(found)
    network = LoRANetwork(adapters, layers).attach()
    logger.info(
        "LoRA: %d adapters, %d parameters",
        len(adapters),
        sum(p.numel() for p in network.parameters()),
    )
    return network, specs


def kohya_state_dict(network: LoRANetwork) -> dict[str, Tensor]:
    """The adapters as a kohya LoRA file: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    return {k: v.detach().contiguous() for k, v in network.state_dict().items()}


def param_groups(network: LoRANetwork, specs: Mapping[str, AdapterSpec]) -> list[dict]:
    """Optimizer groups, one per part, with the part's own learning rate when it has one."""
    prefixes = {"unet": lora.UNET_PREFIX, "text_encoder": "lora_te"}  # lora_te_, lora_te1_, ...
    groups = []
    for part, spec in specs.items():
        params = [
            p
            for name, m in network.items()
            if name.startswith(prefixes[part])
            for p in m.parameters()
        ]
        group = {"params": params, "name": f"lora_{part}"}
        if spec.learning_rate is not None:
            group["lr"] = spec.learning_rate
        groups.append(group)
    return groups


def all_layers(model) -> dict[str, nn.Module]:
    """Every layer a LoRA file may name: kohya's diffusers-style names, the older names of the
    original layout (`lora_unet_input_blocks_1_1_proj_in`), and the text encoder's."""
    unet = model.model.diffusion_model
    everything = lora.targets_of(list(lora.UNET_TARGETS), lora.UNET_TARGETS, "unet")
    layers = lora.adaptable_layers(unet, everything, unet_module_names(unet), lora.UNET_PREFIX)
    layers |= lora.adaptable_layers(unet, everything, None, lora.UNET_PREFIX)
    if not text_encoders(model):
        return layers
    return layers | part_layers(model, "text_encoder", list(lora.TEXT_ENCODER_TARGETS))


def file_adapters(state_dict: Mapping[str, Tensor], path) -> dict[str, dict[str, Tensor]]:
    """{module name: {suffix: tensor}} of a kohya-layout LoRA file; other layouts refused."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        suffix = next((s for s in lora.FILE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise CheckpointError(
                f"LoRA file {path}: key {key!r} is not in the kohya layout (<module>"
                f"{', <module>'.join(lora.FILE_SUFFIXES)}); LoHa, LoKr and DoRA files are not "
                "supported"
            )
        modules.setdefault(key.removesuffix(suffix), {})[suffix] = value
    return modules


def load_lora_file(model, path: str | os.PathLike, multiplier: float = 1.0) -> int:
    """Merge a kohya-layout LoRA file into the model's weights, `multiplier` times; returns the
    number of layers changed. Every module the file names must exist in the model."""
    modules = file_adapters(read_state_dict(path), path)
    layers = all_layers(model)
    unmatched = sorted(set(modules) - set(layers))
    if unmatched:
        what = "matches nothing in" if len(unmatched) == len(modules) else "has modules not in"
        raise CheckpointError(
            f"LoRA file {path} {what} this model ({len(unmatched)} of {len(modules)}, e.g. "
            f"{unmatched[:3]}); expected kohya names such as {sorted(layers)[:2]}"
        )
    adapters = {}
    for name, tensors in modules.items():
        down, up = tensors[".lora_down.weight"], tensors[".lora_up.weight"]
        rank = down.shape[0]
        alpha = tensors.get(".alpha", torch.tensor(float(rank)))
        adapter = LoRAModule(layers[name], rank, float(alpha))
        try:
            adapter.load_state_dict(
                {"lora_down.weight": down, "lora_up.weight": up, "alpha": alpha}
            )
        except RuntimeError as err:
            raise CheckpointError(
                f"LoRA file {path}: {name} does not fit the model: {err}"
            ) from err
        adapters[name] = adapter
    network = LoRANetwork(adapters, layers)
    network.merge(multiplier)
    logger.info("%s: merged into %d layers (x %.2f)", path, len(network), multiplier)
    return len(network)


def merged_state_dict(model) -> dict[str, Tensor]:
    """The model's original-layout state dict with its adapters merged into the weights."""
    if model.lora is not None:
        model.lora.merge()
    return {k: v for k, v in model.state_dict().items() if not k.startswith(LORA_PREFIX)}


def parse_lora_arg(value: str) -> tuple[str, float]:
    """FILE[:SCALE] of the scripts' --lora flag."""
    path, sep, scale = value.rpartition(":")
    if not sep or not scale.replace(".", "", 1).replace("-", "", 1).isdigit():
        return value, 1.0
    return path, float(scale)
