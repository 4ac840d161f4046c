"""Read a diffusers folder (`unet/`, `vae/`, `text_encoder/`) into the original SD key layout.

diffusers names modules its own way (`down_blocks.0.resnets.0.conv1` for the original
`input_blocks.1.0.in_layers.2`). The name maps are derived by walking the ldm modules being
loaded into, so they hold for any UNetModel / AutoencoderKL a config builds (tiny, SD 1.x, 2.x).
Parameter names agree; only 1x1 convolutions that diffusers stores as Linear change shape. The
text encoders, SD 2.x's open_clip tower above all, are `ldm.diffusers_text`'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, is_diffusers_folder, load_torch_file, read_state_dict
from ldm.diffusers_text import is_openclip, text_encoder_tensors, unshipped_weights
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.model import AttnBlock, ResnetBlock
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample

logger = logging.getLogger(__name__)

# The weight files diffusers and transformers write, in the order they are preferred.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
INDEX_SUFFIX = ".index.json"  # a sharded model: {"weight_map": {key: shard file}}
# Which part of a pipeline a single model folder is, from its config.json.
CLASS_KINDS = dict(UNet2DConditionModel="unet", AutoencoderKL="vae", CLIPTextModel="text_encoder")
FOLDER_LAYOUT = (
    "a diffusers folder holds unet/, vae/ and text_encoder/ (each a config.json and "
    "diffusion_pytorch_model.safetensors or model.safetensors, or .bin), usually with a "
    "model_index.json; a single model folder (e.g. unet/ alone) loads that model only"
)

# Within one ldm block, the modules whose diffusers name differs ("" is the block itself).
RESBLOCK_NAMES = {  # UNet ResBlock -> ResnetBlock2D
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET_NAMES = {"nin_shortcut": "conv_shortcut", "temb_proj": "time_emb_proj"}
VAE_ATTENTION_NAMES = dict(norm="group_norm", q="to_q", k="to_k", v="to_v", proj_out="to_out.0")
# Attention names of diffusers files written before 0.14, and their current names.
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
OLD_ATTENTION = re.compile(r"\.(query|key|value|proj_attn)(?=\.(weight|bias)$)")


def param_modules(module: nn.Module) -> list[str]:
    """Paths of the submodules of `module` (itself as "") that hold parameters of their own."""
    return [
        name
        for name, sub in module.named_modules()
        if next(sub.parameters(recurse=False), None) is not None
    ]


def renamed(module: nn.Module, original: str, target: str, names: Mapping[str, str]) -> dict:
    """{original path: target path} for `module`'s parameter modules, found under `original`
    and `target`; a path listed in `names` takes that name, any other keeps its own."""
    paths = param_modules(module)
    return {join(original, path): join(target, names.get(path, path)) for path in paths}


def join(*parts: str) -> str:
    """A module path from parts, some of them empty."""
    return ".".join(p for p in parts if p)


def unet_layer_names(layer: nn.Module, original: str, target: str) -> dict:
    """Names of one layer of a TimestepEmbedSequential (a ResBlock, SpatialTransformer, whose
    insides diffusers named as the original, or resampler) at its two paths."""
    renames = [(ResBlock, RESBLOCK_NAMES), (SpatialTransformer, {}), (Downsample, {"op": "conv"})]
    for cls, names in [*renames, (Upsample, {})]:
        if isinstance(layer, cls):
            return renamed(layer, original, target, names)
    raise CheckpointError(
        f"{original} is a {type(layer).__name__}, which diffusers' UNet2DConditionModel has no "
        "counterpart for (use_spatial_transformer: true is needed)"
    )


def layer_kind(layer: nn.Module) -> str:
    """The diffusers list a UNet layer goes in: resnets, attentions, downsamplers, upsamplers."""
    kinds = {ResBlock: "resnets", Downsample: "downsamplers", Upsample: "upsamplers"}
    return next((kind for cls, kind in kinds.items() if isinstance(layer, cls)), "attentions")


def level_names(blocks: Iterable[nn.Module], original: str, target: str, start: int = 0) -> dict:
    """Names of the input or output blocks from index `start`: each block is one entry of its
    level's resnets (and attentions), and a resampler closes the level."""
    names, level, index = {}, 0, 0
    for i, block in list(enumerate(blocks))[start:]:
        kinds = [layer_kind(layer) for layer in block]
        for j, (layer, kind) in enumerate(zip(block, kinds, strict=True)):
            position = "0" if kind.endswith("samplers") else str(index)
            path = f"{target}.{level}.{kind}.{position}"
            names |= unet_layer_names(layer, f"{original}.{i}.{j}", path)
        resampled = any(kind.endswith("samplers") for kind in kinds)
        level, index = (level + 1, 0) if resampled else (level, index + 1)
    return names


def middle_names(block: nn.Module) -> dict:
    """Names of the middle block: resnets.0, attentions.0, resnets.1."""
    names, counts = {}, {"resnets": 0, "attentions": 0}
    for j, layer in enumerate(block):
        kind = layer_kind(layer)
        path = f"mid_block.{kind}.{counts[kind]}"
        names |= unet_layer_names(layer, f"middle_block.{j}", path)
        counts[kind] += 1
    return names


def unet_module_names(unet: nn.Module) -> dict[str, str]:
    """{original module path: diffusers UNet2DConditionModel module path} for every module of
    an ldm UNetModel that holds parameters, e.g. `input_blocks.1.0.in_layers.2` ->
    `down_blocks.0.resnets.0.conv1`, `out.2` -> `conv_out`."""
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
    names |= renamed(unet.input_blocks[0], "input_blocks.0", "", {"0": "conv_in"})
    names |= level_names(unet.input_blocks, "input_blocks", "down_blocks", start=1)
    names |= middle_names(unet.middle_block)
    names |= level_names(unet.output_blocks, "output_blocks", "up_blocks")
    names |= {"out.0": "conv_norm_out", "out.2": "conv_out"}
    return names


def vae_block_names(module: nn.Module, original: str, target: str) -> dict:
    """Names of one ResnetBlock or AttnBlock of the autoencoder (an Identity has none)."""
    renames = [(ResnetBlock, VAE_RESNET_NAMES), (AttnBlock, VAE_ATTENTION_NAMES)]
    names = next((names for cls, names in renames if isinstance(module, cls)), {})
    return renamed(module, original, target, names)


def mid_names(mid: nn.Module, side: str) -> dict:
    """Names of an Encoder's or Decoder's middle: block_1, attn_1, block_2."""
    parts = (("block_1", "resnets.0"), ("attn_1", "attentions.0"), ("block_2", "resnets.1"))
    names = {}
    for name, target in parts:
        names |= vae_block_names(
            getattr(mid, name), f"{side}.mid.{name}", f"{side}.mid_block.{target}"
        )
    return names


def vae_level_names(level: nn.Module, original: str, target: str) -> dict:
    """Names of one resolution level: `block.{j}`, `attn.{j}` and its resampler, if any."""
    names = {}
    for attr, kind in (("block", "resnets"), ("attn", "attentions")):
        for j, block in enumerate(getattr(level, attr)):
            names |= vae_block_names(block, f"{original}.{attr}.{j}", f"{target}.{kind}.{j}")
    for attr in ("downsample", "upsample"):
        if hasattr(level, attr):  # diffusers' downsamplers.0 / upsamplers.0
            sampler = f"{target}.{attr}rs.0"
            names |= renamed(getattr(level, attr), f"{original}.{attr}", sampler, {})
    return names


def coder_names(coder: nn.Module, side: str) -> dict:
    """Names of the Encoder (`side` "encoder") or the Decoder ("decoder").

    The Decoder keeps its levels numbered from the highest resolution (`decoder.up.0` is
    applied last), as the Encoder does; diffusers numbers them in the order applied.
    """
    ends = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    names = {f"{side}.{name}": f"{side}.{target}" for name, target in ends.items()}
    names |= mid_names(coder.mid, side)
    levels = coder.down if side == "encoder" else coder.up
    for i, level in enumerate(levels):
        applied = i if side == "encoder" else len(levels) - 1 - i
        prefix = "down" if side == "encoder" else "up"
        target = f"{side}.{prefix}_blocks.{applied}"
        names |= vae_level_names(level, f"{side}.{prefix}.{i}", target)
    return names


def vae_module_names(autoencoder: nn.Module) -> dict[str, str]:
    """{original module path: diffusers AutoencoderKL module path} for every module of an ldm
    AutoencoderKL that holds parameters, the training loss aside; e.g. `decoder.up.0.block.1`
    -> `decoder.up_blocks.2.resnets.1`, `encoder.mid.attn_1.q` -> `...attentions.0.to_q`."""
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    names |= coder_names(autoencoder.encoder, "encoder")
    names |= coder_names(autoencoder.decoder, "decoder")
    return names


def text_encoder_module_names(embedder: nn.Module) -> dict[str, str]:
    """{original module path: transformers CLIPTextModel module path} of a FrozenCLIPEmbedder:
    the same names under the original `transformer.text_model.` level. A FrozenOpenCLIPEmbedder
    keeps its own: `diffusers_text` renames the folder's tensors to open_clip's keys."""
    if is_openclip(embedder):
        return {path: path for path in param_modules(embedder)}
    text_model = embedder.transformer.text_model
    return {join("transformer.text_model", path): path for path in param_modules(text_model)}


class Part(NamedTuple):
    """One network of a model and the diffusers subfolder its weights come from."""

    kind: str  # the subfolder: unet, vae or text_encoder
    prefix: str  # the network's keys in the model's state dict, e.g. "model.diffusion_model."
    module: nn.Module


def part_kind(module: nn.Module) -> str | None:
    """The diffusers subfolder that holds the weights of `module`, if it is such a network."""
    # Imported here: both modules import ldm.checkpoint's loaders, which call this module.
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

    kinds = {
        UNetModel: "unet",
        AutoencoderKL: "vae",
        FrozenCLIPEmbedder: "text_encoder",
        FrozenOpenCLIPEmbedder: "text_encoder",
    }
    return next((kind for cls, kind in kinds.items() if isinstance(module, cls)), None)


def model_parts(model: nn.Module) -> list[Part]:
    """The networks of `model` that a diffusers folder has weights for, found by type: a
    LatentDiffusion's UNet, autoencoder and (open) CLIP text encoder, or a network alone."""
    parts = []
    for name, module in model.named_modules():
        kind = part_kind(module)
        if kind and not any(name.startswith(p.prefix) for p in parts if p.prefix):
            parts.append(Part(kind, f"{name}." if name else "", module))
    return parts


def module_names(part: Part) -> dict[str, str]:
    """{original module path: diffusers module path} of the part's network."""
    makers = dict(unet=unet_module_names, vae=vae_module_names)
    return makers.get(part.kind, text_encoder_module_names)(part.module)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of one diffusers (or transformers) model folder: one file, or the
    shards its index names; safetensors before .bin."""
    for suffix in WEIGHT_SUFFIXES:
        for stem in WEIGHT_STEMS:
            if (folder / f"{stem}{suffix}").is_file():
                return [folder / f"{stem}{suffix}"]
            index = folder / f"{stem}{suffix}{INDEX_SUFFIX}"
            if index.is_file():
                shards = json.loads(index.read_text())["weight_map"].values()
                return [folder / shard for shard in sorted(set(shards))]
    variants = sorted(folder.glob(f"*{WEIGHT_SUFFIXES[0]}")) or sorted(folder.glob("*.bin"))
    if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors
        return variants
    raise CheckpointError(
        f"{folder} holds no single weight file ({' or '.join(WEIGHT_STEMS)} "
        f"with {' or '.join(WEIGHT_SUFFIXES)}; found {[p.name for p in variants] or 'none'})"
    )


def read_folder(folder: Path, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one model folder, under diffusers' (or transformers') own names."""
    tensors = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            tensors |= read_state_dict(path)
        else:  # weights only, unless the caller trusts the file
            tensors |= load_torch_file(path, unsafe_pickle=unsafe_pickle)
    return tensors


def current_names(
    part: Part, folder: Path, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`tensors` of the part's `folder` under the names current diffusers and transformers
    give them (old files name the VAE's attention query/key/value/proj_attn, and put CLIP
    under `text_model.`), or open_clip's for SD 2.x's text encoder."""
    if part.kind == "vae":
        return {
            OLD_ATTENTION.sub(lambda m: "." + OLD_ATTENTION_NAMES[m[1]], k): v
            for k, v in tensors.items()
        }
    if part.kind == "text_encoder":
        return text_encoder_tensors(part.module, folder, tensors)
    return dict(tensors)


def fitted(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`tensor` in `shape` when the two differ only as a 1x1 convolution's (C_out, C_in, 1, 1)
    and a Linear's (C_out, C_in) weight (diffusers' VAE attention; proj_in/proj_out of the
    other use_linear choice), else None."""
    as_matrix = [
        tuple(s[:2]) if all(d == 1 for d in s[2:]) else tuple(s) for s in (tensor.shape, shape)
    ]
    return tensor.reshape(shape) if as_matrix[0] == as_matrix[1] else None


def examples(keys: Iterable[str], limit: int = 5) -> str:
    """`keys`, counted, the first `limit` of them named."""
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def diffusers_keys(names: Mapping[str, str], keys: Iterable[str]) -> dict[str, str]:
    """{original key: diffusers key} of the `keys` whose module `names` maps."""
    split = (key.rpartition(".") for key in keys)
    return {
        join(path, param): join(names[path], param) for path, _, param in split if path in names
    }


def convert_part(part: Part, folder: Path, tensors: Mapping[str, torch.Tensor]) -> dict:
    """The part's weights under its original keys (with `part.prefix`), from the tensors of
    its diffusers folder; any key that has no place, or no tensor, raises CheckpointError,
    except the SD 2.x text-encoder weights diffusers drops, which keep the model's values."""
    expected = {k: v for k, v in part.module.state_dict().items() if not k.startswith("loss.")}
    sources = diffusers_keys(module_names(part), expected)
    lacking = {k for k, source in sources.items() if source not in tensors}
    kept = unshipped_weights(part.module, folder, lacking)
    found = {k: fitted(tensors[s], expected[k].shape) for k, s in sources.items() if s in tensors}
    shapes = {k: (tuple(tensors[sources[k]].shape), tuple(expected[k].shape)) for k in found}
    wrong_shape = [
        f"{sources[k]} {a} vs {k} {b}" for k, (a, b) in shapes.items() if found[k] is None
    ]
    problems = {
        "keys this model has no place for": set(tensors) - set(sources.values()),
        "keys the model needs that the folder lacks": {sources[k] for k in lacking - set(kept)},
        "weights of the wrong shape (folder vs model)": wrong_shape,
        "model weights with no diffusers name": set(expected) - set(sources),
    }
    if any(problems.values()):
        listed = "; ".join(f"{title}: {examples(keys)}" for title, keys in problems.items() if keys)
        raise CheckpointError(
            f"{folder} does not fit the {type(part.module).__name__} of this config: {listed}"
        )
    return {part.prefix + k: v for k, v in (found | kept).items()}


def folder_kind(folder: Path) -> str | None:
    """The part a single model folder holds (by the class its config.json names), or None for
    a pipeline folder."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    classes = [data.get("_class_name"), *data.get("architectures", [])]
    return next((CLASS_KINDS[c] for c in classes if c in CLASS_KINDS), None)


def part_folders(folder: Path, parts: list[Part], model: nn.Module) -> list[tuple[Part, Path]]:
    """(part, the folder of its weights) for the parts `folder` is to fill: each part's
    subfolder of a pipeline folder, or the single model folder's own part."""
    model_name = type(model).__name__
    kind = folder_kind(folder)
    if kind is not None:
        found = [(p, folder) for p in parts if p.kind == kind]
        if not found:
            raise CheckpointError(f"{folder} holds a diffusers {kind} alone: {model_name} has none")
        return found
    found = [(p, folder / p.kind) for p in parts]
    missing = [f"{p.kind}/" for p, path in found if not path.is_dir()]
    if missing:
        raise CheckpointError(
            f"{folder} lacks {', '.join(missing)}, which {model_name} needs: {FOLDER_LAYOUT}"
        )
    return found


def original_state_dict(
    folder: str | os.PathLike,
    model: nn.Module,
    *,
    only_unet: bool = False,
    unsafe_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """The weights of the diffusers folder `folder` under the keys of `model`, the fully built
    ldm model they go into (shapes are all that is read: the meta device will do).

    Its UNetModel, AutoencoderKL and FrozenCLIPEmbedder (or FrozenOpenCLIPEmbedder) take
    `unet/`, `vae/`, `text_encoder/` under their prefixes (`model.diffusion_model.`... in a
    LatentDiffusion); the schedule and EMA are left to the model. The SD 2.x text-encoder
    weights diffusers drops (the last layer, text_projection) come from the model as built
    when its `layer` does not use them. With `only_unet`, or a single model folder (`unet/`
    alone), one network is read. A missing subfolder, or a weight with no place or of the wrong
    shape, raises CheckpointError."""
    folder = Path(folder)
    parts = [p for p in model_parts(model) if p.kind == "unet" or not only_unet]
    if not parts:
        raise CheckpointError(
            f"{folder}: {type(model).__name__} has no network a diffusers folder holds "
            "(UNetModel, AutoencoderKL, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder)"
        )
    state_dict, found = {}, part_folders(folder, parts, model)
    for part, source in found:
        tensors = current_names(part, source, read_folder(source, unsafe_pickle=unsafe_pickle))
        state_dict |= convert_part(part, source, tensors)
    logger.info("%s: converted %s from diffusers' layout", folder, [p.kind for p, _ in found])
    return state_dict


def read_weights(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    only_unet: bool = False,
    unsafe_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict at `path` for `model`: a weight file's as stored (`read_state_dict`),
    or a diffusers folder's converted to `model`'s keys (`original_state_dict`)."""
    if is_diffusers_folder(path):
        return original_state_dict(path, model, only_unet=only_unet, unsafe_pickle=unsafe_pickle)
    return read_state_dict(path, unsafe_pickle=unsafe_pickle)
