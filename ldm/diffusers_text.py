"""Read a diffusers folder's `text_encoder/` (a transformers CLIPTextModel) into the keys of
either SD text encoder: FrozenCLIPEmbedder (SD 1.x) or FrozenOpenCLIPEmbedder (SD 2.x).

SD 1.x's encoder is a CLIPTextModel itself, so only the file's vintage needs undoing. SD 2.x's
is open_clip's text tower (`cond_stage_model.model.*`), which diffusers ships as a CLIPTextModel
with one transformer layer fewer and no text_projection: SD 2 conditions on the penultimate
layer, after ln_final, and that is what the shortened CLIPTextModel computes. The weights
diffusers drops are left as the model built them when its `layer` does not use them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

# Buffers older transformers saved that CLIPTextModel recomputes (the original SD files too).
TEXT_ENCODER_BUFFERS = ("embeddings.position_ids",)
OPENCLIP_PREFIX = "model."  # FrozenOpenCLIPEmbedder holds open_clip's text tower as `model`
# CLIPTextModel keys outside the layers, and their open_clip names.
OPENCLIP_NAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# CLIPTextModelWithProjection's Linear (out, in); open_clip multiplies by its transpose.
PROJECTION = ("text_projection.weight", "text_projection")
# Within one layer (CLIPEncoderLayer -> ResidualAttentionBlock), the modules renamed one to one.
OPENCLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# nn.MultiheadAttention keeps query, key and value as one in_proj, stacked in this order.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
BLOCK_KEY = re.compile(rf"{re.escape(OPENCLIP_PREFIX)}transformer\.resblocks\.(\d+)\.")
# What the embedder never reads, whichever its layer: open_clip's pooled-feature projection
# and CLIP's contrastive temperature.
OPENCLIP_UNUSED = ("text_projection", "logit_scale")


def is_openclip(embedder: nn.Module) -> bool:
    """Whether `embedder` is SD 2.x's FrozenOpenCLIPEmbedder."""
    # Imported here: it brings in open_clip and transformers, which the VAE's loaders, that
    # import this module, need not.
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

    return isinstance(embedder, FrozenOpenCLIPEmbedder)


def text_encoder_tensors(
    embedder: nn.Module, folder: Path, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of a `text_encoder/` folder under current transformers names (old files put
    them under `text_model.` and save position_ids) or, for a FrozenOpenCLIPEmbedder, under
    its keys (`model.transformer.resblocks.0.attn.in_proj_weight`...)."""
    tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    tensors = {k: v for k, v in tensors.items() if k not in TEXT_ENCODER_BUFFERS}
    if not is_openclip(embedder):
        return tensors
    check_openclip_config(embedder, folder)
    return openclip_tensors(tensors)


def openclip_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel tensors under open_clip text-tower keys, q, k and v stacked into in_proj;
    a key with no open_clip name (or an incomplete q, k, v) keeps its own, to be reported."""
    converted, projections = {}, {}
    for key, value in tensors.items():
        match = LAYER_KEY.fullmatch(key)
        if match and match[2] in QKV:
            projections.setdefault((match[1], match[3]), {})[match[2]] = value
        elif key == PROJECTION[0]:
            converted[OPENCLIP_PREFIX + PROJECTION[1]] = value.T.contiguous()
        else:
            converted[openclip_key(key, match)] = value
    for (layer, param), parts in projections.items():
        if set(parts) == set(QKV):
            in_proj = f"{OPENCLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{param}"
            converted[in_proj] = torch.cat([parts[name] for name in QKV])  # (3 * width, ...)
        else:
            converted |= {f"encoder.layers.{layer}.{n}.{param}": v for n, v in parts.items()}
    return converted


def openclip_key(key: str, match: re.Match | None) -> str:
    """The open_clip key of a CLIPTextModel key other than q, k, v (`match`: its LAYER_KEY
    match), or the key itself when it has none."""
    if key in OPENCLIP_NAMES:
        return OPENCLIP_PREFIX + OPENCLIP_NAMES[key]
    if match and match[2] in OPENCLIP_LAYER_NAMES:
        layer, name, param = match[1], OPENCLIP_LAYER_NAMES[match[2]], match[3]
        return f"{OPENCLIP_PREFIX}transformer.resblocks.{layer}.{name}.{param}"
    return key


def check_openclip_config(embedder: nn.Module, folder: Path) -> None:
    """Raise CheckpointError unless the folder's config.json agrees with `embedder` on what
    the weights' shapes do not show: the activation, the heads and the LayerNorm epsilon."""
    from open_clip.transformer import QuickGELU  # with the embedder, open_clip is imported

    path = folder / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    block = embedder.model.transformer.resblocks[0]
    ours = {
        "hidden_act": "quick_gelu" if isinstance(block.mlp.gelu, QuickGELU) else "gelu",
        "num_attention_heads": block.attn.num_heads,
        "layer_norm_eps": block.ln_1.eps,
    }
    differ = [f"{k} {config[k]!r} vs {v!r}" for k, v in ours.items() if config.get(k, v) != v]
    if differ:
        raise CheckpointError(
            f"{path} does not fit the FrozenOpenCLIPEmbedder of this config (folder vs model): "
            + ", ".join(differ)
        )


def unshipped_weights(
    embedder: nn.Module, folder: Path, lacking: set[str]
) -> dict[str, torch.Tensor]:
    """{key: the embedder's own value} for the `lacking` weights (the keys the folder has no
    tensor for) that a FrozenOpenCLIPEmbedder does not use: text_projection, logit_scale and
    the layers its `layer` skips (on the meta device, meta tensors). Other lacking keys are
    left to the caller to report."""
    if not is_openclip(embedder) or not lacking:
        return {}
    check_last_layer(embedder, folder, lacking)
    blocks = len(embedder.model.transformer.resblocks)
    skipped = range(blocks - embedder.layer_idx, blocks)
    unused = {OPENCLIP_PREFIX + name for name in OPENCLIP_UNUSED}
    kept = sorted(k for k in lacking if k in unused or key_block(k) in skipped)
    if kept:
        names = dict.fromkeys(short_name(k) for k in kept)
        logger.info(
            "%s: %d weights the folder lacks (%s) keep the FrozenOpenCLIPEmbedder's own values: "
            "layer %r does not use them",
            folder,
            len(kept),
            ", ".join(names),
            embedder.layer,
        )
    state_dict = embedder.state_dict()
    return {k: state_dict[k] for k in kept}


def check_last_layer(embedder: nn.Module, folder: Path, lacking: set[str]) -> None:
    """Raise CheckpointError if what the folder lacks is the last transformer layer (as in
    diffusers' SD 2.x text encoders), the unused weights aside, and the embedder's `layer`
    runs that layer. Other gaps are listed with the rest by the caller."""
    last = len(embedder.model.transformer.resblocks) - 1
    unused = {OPENCLIP_PREFIX + name for name in OPENCLIP_UNUSED}
    in_last = {k for k in lacking if key_block(k) == last}
    if embedder.layer_idx == 0 and in_last and lacking <= in_last | unused:
        raise CheckpointError(
            f"{folder} lacks the last transformer layer of this FrozenOpenCLIPEmbedder "
            f"(transformer.resblocks.{last}; diffusers leaves it out of SD 2.x text encoders), "
            f"which layer {embedder.layer!r} needs: use layer: penultimate, as SD 2.x's configs "
            "do, or an original-layout checkpoint"
        )


def key_block(key: str) -> int | None:
    """The index of the transformer layer an open_clip key belongs to, if any."""
    match = BLOCK_KEY.match(key)
    return int(match[1]) if match else None


def short_name(key: str) -> str:
    """An open_clip key without the `model.` prefix, a layer's keys as `resblocks.{i}.*`."""
    block = key_block(key)
    name = key.removeprefix(OPENCLIP_PREFIX)
    return name if block is None else f"transformer.resblocks.{block}.*"
