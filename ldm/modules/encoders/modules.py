"""Frozen CLIP text encoders that turn prompts into the UNet's cross-attention `context`.

`FrozenCLIPEmbedder` is SD 1.x's encoder (OpenAI CLIP ViT-L/14 text tower on transformers,
Radford et al. 2021, https://arxiv.org/abs/2103.00020); `FrozenOpenCLIPEmbedder` is SD 2.x's
(OpenCLIP ViT-H/14, Cherti et al. 2022, https://arxiv.org/abs/2212.07143). Both are built with
random weights and never download anything: the weights come from the SD checkpoint, whose key
layout (`cond_stage_model.transformer.text_model.*`, `cond_stage_model.model.*`) they keep.

Prompts longer than the 77-token context are truncated (`long_prompts: truncate`, with a warning
once per process) or encoded 77 tokens at a time (`long_prompts: chunk`), as the AUTOMATIC1111
web UI and kohya's sd-scripts do: the context is then (B, 77 * k, D) for the most chunks k in
the batch.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import open_clip
import torch
from einops import rearrange
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoint import load_weights, read_state_dict
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.tokenizer import (
    MAX_LENGTH,
    VOCAB_SIZE,
    find_tokenizer_dir,
    load_tokenizer,
    prompt_ids,
    split_into_chunks,
    tokenize,
)

logger = logging.getLogger(__name__)

DEVICE_REASON = (
    "ignored: Lightning / .to() move the module, and tokens follow its parameters' device"
)
OPENCLIP_VERSION_REASON = (
    "names the open_clip pretrained tag the SD 2.x weights started from; the weights come from "
    "the SD checkpoint (a path to an open_clip weights file is loaded, though)"
)
# Constructor params kept for config compatibility only, with the reason each is not used.
COMPAT_PARAMS = {
    "device": DEVICE_REASON,
    "version": f"FrozenOpenCLIPEmbedder only: {OPENCLIP_VERSION_REASON}",
}

# Text-tower sizes shared by every built-in CLIP: the CLIP BPE vocabulary and 77 positions.
# bos/eos/pad ids are those of HF's openai config: eos_token_id=2 makes the pooled output take
# the argmax of the ids, i.e. the first EOS (49407, the largest id).
CLIP_SHARED = dict(
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
CLIP_CONFIGS = {
    "openai/clip-vit-large-patch14": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
    ),
    "ldm/clip-tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    ),
}
CLIP_LAYERS = ("last", "pooled", "hidden", "penultimate")

# open_clip model configs we add to those open_clip ships (`open_clip.list_models()`).
OPENCLIP_CONFIGS = {
    "ldm/openclip-tiny": {
        "embed_dim": 32,
        "text_cfg": {
            "context_length": MAX_LENGTH,
            "vocab_size": VOCAB_SIZE,
            "width": 32,
            "heads": 4,
            "layers": 2,
        },
    },
    # The tiny SDXL's second encoder, shaped as ViT-bigG-14: embed_dim = width, 64-wide heads
    # there (16 here), GELU; three blocks, so that "penultimate" is a block of its own.
    "ldm/openclip-bigg-tiny": {
        "embed_dim": 48,
        "text_cfg": {
            "context_length": MAX_LENGTH,
            "vocab_size": VOCAB_SIZE,
            "width": 48,
            "heads": 3,
            "layers": 3,
        },
    },
}
OPENCLIP_TEXT_KEYS = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "ls_init_value",
}
OPENCLIP_TOP_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
# Blocks to skip at the end of the tower (the SD 2 repository's `layer_idx`).
OPENCLIP_LAYERS = {"last": 0, "penultimate": 1}
# The tokenizer open_clip.tokenize uses; it pads with 0.
OPENCLIP_TOKENIZER, OPENCLIP_PAD_ID = open_clip.tokenizer._tokenizer, 0
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature; SD checkpoints overwrite it
LONG_PROMPTS = ("truncate", "chunk")
TRUNCATION_WARNED: set[str] = set()  # the encoder classes that have warned of a long prompt


def warn_device(cls_name: str, device: str | torch.device | None) -> None:
    """Warn that `device` is a compat param when a config sets it."""
    if device is not None:
        warnings.warn(
            f"{cls_name}: device={device!r} is ignored ({DEVICE_REASON}); move the module with "
            ".to(device) instead.",
            UserWarning,
            stacklevel=3,
        )


def check_max_length(cls_name: str, max_length: int, limit: int, what: str) -> int:
    """`max_length`, if it leaves room for BOS, EOS and a token within `limit` positions."""
    if not 2 < max_length <= limit:
        raise ValueError(f"{cls_name}: max_length={max_length}; pass 3 to {limit} ({what})")
    return max_length


def check_long_prompts(cls_name: str, long_prompts: str) -> str:
    """`long_prompts`, if it is one of LONG_PROMPTS."""
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"{cls_name}: long_prompts={long_prompts!r}; pass one of {LONG_PROMPTS}")
    return long_prompts


def warn_truncated(cls_name: str, ids: list[list[int]], max_length: int) -> None:
    """Log once per process and encoder class that a prompt was cut to max_length tokens."""
    n_tokens = max(len(prompt) for prompt in ids) + 2  # with BOS and EOS
    if n_tokens <= max_length or cls_name in TRUNCATION_WARNED:
        return
    TRUNCATION_WARNED.add(cls_name)
    logger.warning(
        "%s: a prompt of %d tokens (with BOS and EOS) was truncated to max_length=%d; set "
        "long_prompts: chunk in cond_stage_config.params to encode the rest, %d tokens at a "
        "time. This is logged once.",
        cls_name,
        n_tokens,
        max_length,
        max_length - 2,
    )


class FrozenEncoder(nn.Module):
    """Base of the text encoders: `freeze()`, a `train()` that keeps a frozen encoder in eval,
    and the `long_prompts` rule that lays token ids out in chunks."""

    def __init__(self, max_length: int, long_prompts: str) -> None:
        super().__init__()
        self.frozen = False
        self.max_length = max_length
        self.long_prompts = check_long_prompts(type(self).__name__, long_prompts)

    def freeze(self) -> None:
        """Eval mode for good, and no gradients for any parameter."""
        self.frozen = True
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def train(self, mode: bool = True) -> FrozenEncoder:
        """As nn.Module.train, except that a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    def encode(self, text: str | list[str]) -> torch.Tensor:
        """The original API's name for forward."""
        return self(text)

    def chunk_tokens(self, ids: list[list[int]], bos: int, eos: int, pad: int) -> torch.Tensor:
        """Token ids `(B*k, max_length)` of untruncated prompt ids (no BOS / EOS): all k chunks
        with long_prompts "chunk", the first (k = 1, warned when cut) with "truncate"."""
        if self.long_prompts == "truncate":
            warn_truncated(type(self).__name__, ids, self.max_length)
        max_chunks = None if self.long_prompts == "chunk" else 1
        return split_into_chunks(ids, self.max_length, bos, eos, pad, max_chunks)


def join_chunks(features: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-chunk features `(B*k, L, D)` → one context per prompt `(B, k*L, D)`."""
    return rearrange(features, "(b k) l d -> b (k l) d", b=batch_size)


class TextModelWrapper(nn.Module):
    """Holds a flat `CLIPTextModel` (transformers >= 5.6) as `text_model`, as SD v1 files expect."""

    def __init__(self, text_model: CLIPTextModel) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, **kwargs):
        return self.text_model(**kwargs)


def make_clip_text_model(version: str) -> tuple[CLIPTextModel, str | None]:
    """(random-weight or locally saved CLIPTextModel, directory to read a tokenizer from)."""
    if version in CLIP_CONFIGS:
        return CLIPTextModel(CLIPTextConfig(**CLIP_SHARED, **CLIP_CONFIGS[version])), None
    if os.path.isdir(version):
        model = CLIPTextModel.from_pretrained(version, local_files_only=True)
        return model, find_tokenizer_dir(version)
    raise ValueError(
        f"FrozenCLIPEmbedder: version={version!r} is neither a built-in name nor a local "
        f"directory. Pass a built-in name ({', '.join(CLIP_CONFIGS)}; random weights that the SD "
        "checkpoint fills) or a local directory holding a transformers CLIPTextModel saved "
        "with save_pretrained (config.json + weights). Nothing is downloaded from a hub."
    )


def resolve_clip_layer(
    layer: str, layer_idx: int | None, num_layers: int
) -> tuple[str, int | None]:
    """Validate `layer` / `layer_idx`; "penultimate" means hidden with layer_idx=-2."""
    if layer not in CLIP_LAYERS:
        raise ValueError(f"FrozenCLIPEmbedder: layer={layer!r}; pass one of {CLIP_LAYERS}")
    if layer == "penultimate":
        if layer_idx not in (None, -2):
            raise ValueError(
                f"FrozenCLIPEmbedder: layer='penultimate' means layer_idx=-2, got {layer_idx}; "
                "pass layer='hidden' to pick another layer_idx"
            )
        return "hidden", -2
    if layer != "hidden":
        return layer, None
    # hidden_states holds the embeddings' output and then one entry per layer.
    if not isinstance(layer_idx, int) or not -(num_layers + 1) <= layer_idx <= num_layers:
        raise ValueError(
            f"FrozenCLIPEmbedder: layer='hidden' needs an int layer_idx in "
            f"[{-(num_layers + 1)}, {num_layers}] (e.g. -2 for the penultimate), got {layer_idx!r}"
        )
    return layer, layer_idx


class FrozenCLIPEmbedder(FrozenEncoder):
    """SD 1.x text encoder: CLIP ViT-L/14 text tower (transformers) → context `(B, 77, 768)`.

    Args:
        version: a built-in name (`openai/clip-vit-large-patch14`, `ldm/clip-tiny`; random
            weights) or a local directory with a saved `CLIPTextModel` (and maybe a tokenizer).
        layer: "last" (last_hidden_state, final LayerNorm applied), "pooled" (`(B, 1, D)`),
            "hidden" (`hidden_states[layer_idx]`, no final LayerNorm) or "penultimate"
            (hidden with layer_idx=-2).
        always_return_pooled: forward returns `(context, pooled)`, pooled the model's
            `pooler_output` `(B, D)` (of a prompt's first chunk when chunked), as
            generative-models' embedder of this name.
        long_prompts: "truncate" (to max_length tokens, logged once) or "chunk" (every
            max_length - 2 tokens encoded as a chunk of their own: `(B, k*77, D)`).
    """

    COMPAT_PARAMS = {"device": DEVICE_REASON}

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        max_length: int = MAX_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        always_return_pooled: bool = False,
        long_prompts: str = "truncate",
    ) -> None:
        warn_device(type(self).__name__, device)
        self.return_pooled = always_return_pooled
        text_model, tokenizer_dir = make_clip_text_model(version)
        config = text_model.config
        limit, what = config.max_position_embeddings, "the model's position embeddings"
        max_length = check_max_length("FrozenCLIPEmbedder", max_length, limit, what)
        super().__init__(max_length, long_prompts)
        self.tokenizer_dir = tokenizer_dir
        self.layer, self.layer_idx = resolve_clip_layer(layer, layer_idx, config.num_hidden_layers)
        if self.layer == "pooled" and long_prompts == "chunk":
            raise ValueError(
                "FrozenCLIPEmbedder: layer='pooled' with long_prompts='chunk': a pooled output "
                "has no sequence to join chunks along; pass long_prompts='truncate'"
            )
        self.transformer = TextModelWrapper(text_model)
        if freeze:
            self.freeze()

    @property
    def tokenizer(self):
        """The HF tokenizer (cached per process); call `tokenize` to get cleaned, padded ids."""
        return load_tokenizer(self.tokenizer_dir)

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        """Token ids `(B, max_length)` on the CPU: BOS, prompt, EOS, padded with EOS."""
        return tokenize(self.tokenizer, text, self.max_length)

    def forward(self, text: str | list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Context `(B, k*77, D)` (k = 1 unless long prompts are chunked), or `(B, 1, D)` pooled;
        with always_return_pooled, `(context, pooled (B, D))`."""
        tok = self.tokenizer
        ids = prompt_ids(tok, text)
        tokens = self.chunk_tokens(ids, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        out = self.transformer(
            input_ids=tokens.to(device), output_hidden_states=self.layer == "hidden"
        )
        context = join_chunks(self.layer_features(out), len(ids))  # (B, k*77, D)
        if not self.return_pooled:
            return context
        return context, out.pooler_output.unflatten(0, (len(ids), -1))[:, 0]  # (B, D)

    def layer_features(self, out) -> torch.Tensor:
        """The `layer`'s features `(N, 77, D)`, or `(N, 1, D)` pooled, of a model output."""
        if self.layer == "last":
            return out.last_hidden_state  # (N, 77, D)
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]  # (N, 1, D)
        return out.hidden_states[self.layer_idx]  # (N, 77, D)


def openclip_model_config(arch: str) -> dict:
    """The open_clip model config named `arch` (built-in tiny ones first), checked for support."""
    config = OPENCLIP_CONFIGS.get(arch) or open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(
            f"FrozenOpenCLIPEmbedder: arch={arch!r} is unknown; pass ViT-H-14 (SD 2.x), "
            f"{', '.join(OPENCLIP_CONFIGS)}, or another name from open_clip.list_models()"
        )
    unsupported = sorted(set(config) - OPENCLIP_TOP_KEYS)
    unsupported += sorted(set(config["text_cfg"]) - OPENCLIP_TEXT_KEYS)
    if unsupported:
        raise ValueError(
            f"FrozenOpenCLIPEmbedder: arch={arch!r} sets {unsupported}, which this plain text "
            "tower does not support; pass an arch whose text_cfg uses only "
            f"{sorted(OPENCLIP_TEXT_KEYS)}"
        )
    return config


def make_openclip_text(config: dict) -> TextTransformer:
    """open_clip's text tower plus `logit_scale`: the keys of a CLIP model with no visual tower."""
    text_cfg = config["text_cfg"]
    model = TextTransformer(
        **text_cfg,
        output_dim=config["embed_dim"],
        act_layer=QuickGELU if config.get("quick_gelu", False) else nn.GELU,
    )
    model.logit_scale = nn.Parameter(torch.full((), INIT_LOGIT_SCALE))
    return model


def causal_mask(n: int, like: torch.Tensor) -> torch.Tensor:
    """Additive mask `(n, n)`: -inf above the diagonal, so token i sees tokens ≤ i."""
    return torch.full((n, n), float("-inf"), dtype=like.dtype, device=like.device).triu(1)


def is_weights_path(version: str) -> bool:
    """Whether `version` names a file rather than an open_clip pretrained tag."""
    return os.sep in version or "/" in version or version.endswith((".bin", ".pt", ".safetensors"))


class FrozenOpenCLIPEmbedder(FrozenEncoder):
    """SD 2.x text encoder: OpenCLIP ViT-H/14 text tower → context `(B, 77, 1024)`.

    Args:
        arch: an open_clip model config name (ViT-H-14 for SD 2.x) or `ldm/openclip-tiny`.
        version: the pretrained tag (compat only; see COMPAT_PARAMS) or a path to an open_clip
            weights file, whose text-tower keys are loaded.
        layer: "last" or "penultimate" (stop one block early); ln_final is applied to both.
        long_prompts: "truncate" (to max_length tokens, logged once) or "chunk" (every
            max_length - 2 tokens encoded as a chunk of their own: `(B, k*77, D)`).
    """

    COMPAT_PARAMS = {"device": DEVICE_REASON, "version": OPENCLIP_VERSION_REASON}

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str | torch.device | None = None,
        max_length: int = MAX_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        long_prompts: str = "truncate",
    ) -> None:
        warn_device(type(self).__name__, device)
        if layer not in OPENCLIP_LAYERS:
            raise ValueError(
                f"FrozenOpenCLIPEmbedder: layer={layer!r}; pass one of {tuple(OPENCLIP_LAYERS)}"
            )
        config = openclip_model_config(arch)
        limit = config["text_cfg"].get("context_length", MAX_LENGTH)
        what = f"arch {arch!r}'s context length"
        super().__init__(
            check_max_length("FrozenOpenCLIPEmbedder", max_length, limit, what), long_prompts
        )
        self.layer, self.layer_idx = layer, OPENCLIP_LAYERS[layer]
        self.model = make_openclip_text(config)
        if is_weights_path(version):
            self.load_openclip_weights(version)
        if freeze:
            self.freeze()

    def load_openclip_weights(self, path: str) -> None:
        """Load the text-tower keys of an open_clip CLIP weights file; drop its visual tower."""
        if not os.path.isfile(path):
            raise ValueError(
                f"FrozenOpenCLIPEmbedder: version={path!r} looks like a path but is not a file; "
                "pass an open_clip pretrained tag (e.g. 'laion2b_s32b_b79k') or an existing "
                "open_clip weights file"
            )
        state_dict = {k: v for k, v in read_state_dict(path).items() if not k.startswith("visual.")}
        load_weights(self.model, state_dict)

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        """open_clip token ids `(B, max_length)`: BOS, prompt, EOS, padded with 0."""
        prompts = [text] if isinstance(text, str) else list(text)
        return open_clip.tokenize(prompts, context_length=self.max_length)

    def forward(self, text: str | list[str]) -> torch.Tensor:
        """Context `(B, k*77, D)`: k = 1 unless long prompts are chunked."""
        prompts = [text] if isinstance(text, str) else list(text)
        ids = [OPENCLIP_TOKENIZER.encode(p) for p in prompts]
        sot, eot = OPENCLIP_TOKENIZER.sot_token_id, OPENCLIP_TOKENIZER.eot_token_id
        tokens = self.chunk_tokens(ids, sot, eot, OPENCLIP_PAD_ID)  # (B*k, 77)
        features = self.encode_with_transformer(tokens.to(self.model.positional_embedding.device))
        return join_chunks(features, len(ids))  # (B, k*77, D)

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids `(B, L)` → token features `(B, L, width)` after ln_final."""
        n = tokens.shape[1]
        x = self.model.token_embedding(tokens) + self.model.positional_embedding[:n]  # (B, L, D)
        x = self.text_transformer_forward(x, attn_mask=causal_mask(n, x))
        return self.model.ln_final(x)

    def text_transformer_forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the residual blocks on `(B, L, D)`, skipping the last `layer_idx` of them."""
        blocks = self.model.transformer.resblocks  # batch first in open_clip >= 3
        for block in blocks[: len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=attn_mask)
        return x  # (B, L, D)


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's OpenCLIP text encoder (ViT-bigG/14 in SDXL): the context and, with
    `always_return_pooled`, the pooled text embedding `(B, embed_dim)`, as generative-models'.

    Args (beyond FrozenOpenCLIPEmbedder's):
        always_return_pooled: forward returns `(context, pooled)`; pooled is ln_final of the
            last block at the EOT token, times text_projection (of a prompt's first chunk
            when long prompts are chunked).
        legacy: True applies ln_final to the context, as SD 2.x; False (SDXL) hands the
            chosen block's output on as it is. The pooled output needs legacy: false.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str | torch.device | None = None,
        max_length: int = MAX_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        always_return_pooled: bool = False,
        legacy: bool = True,
        long_prompts: str = "truncate",
    ) -> None:
        if always_return_pooled and legacy:
            raise ValueError(
                "FrozenOpenCLIPEmbedder2: always_return_pooled needs legacy: false (SDXL's "
                "configs set both), as in generative-models"
            )
        super().__init__(arch, version, device, max_length, freeze, layer, long_prompts)
        self.return_pooled, self.legacy = always_return_pooled, legacy

    def forward(self, text: str | list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Context `(B, k*77, D)`, and the pooled `(B, embed_dim)` with always_return_pooled."""
        prompts = [text] if isinstance(text, str) else list(text)
        ids = [OPENCLIP_TOKENIZER.encode(p) for p in prompts]
        sot, eot = OPENCLIP_TOKENIZER.sot_token_id, OPENCLIP_TOKENIZER.eot_token_id
        tokens = self.chunk_tokens(ids, sot, eot, OPENCLIP_PAD_ID)  # (B*k, 77)
        context, pooled = self.encode_layers(tokens.to(self.model.positional_embedding.device))
        context = join_chunks(context, len(ids))  # (B, k*77, D)
        if not self.return_pooled:
            return context
        return context, pooled.unflatten(0, (len(ids), -1))[:, 0]  # (B, embed_dim)

    def encode_layers(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids `(N, L)` → the `layer`'s features `(N, L, width)` and, when asked for,
        the pooled embedding `(N, embed_dim)`."""
        n = tokens.shape[1]
        x = self.model.token_embedding(tokens) + self.model.positional_embedding[:n]  # (N, L, D)
        mask = causal_mask(n, x)
        blocks = self.model.transformer.resblocks
        chosen = None
        for i, block in enumerate(blocks):
            if i == len(blocks) - self.layer_idx:
                chosen = x  # the input of the block "penultimate" stops before
                if not self.return_pooled:
                    break
            x = block(x, attn_mask=mask)
        chosen = x if chosen is None else chosen
        context = self.model.ln_final(chosen) if self.legacy else chosen
        if not self.return_pooled:
            return context, None
        eot = self.model.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(dim=-1)]  # (N, D)
        return context, eot @ self.model.text_projection  # (N, embed_dim)


class ConcatTimestepEmbedderND(nn.Module):
    """SDXL's size and crop conditioning (Podell et al. 2023, sec. 2.2): each of the D numbers
    of a (B, D) tensor (an original size, a crop's top-left, a target size, as (h, w)) gets
    the sinusoidal embedding of a timestep, of `outdim` channels, and the B rows are the
    (B, D * outdim) concatenation, as generative-models' embedder of that name."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim not in (1, 2):
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"ConcatTimestepEmbedderND: expected a (B,) or (B, D) tensor of numbers such as "
                f"(height, width) pairs, got {got}"
            )
        x = x[:, None] if x.ndim == 1 else x  # (B, D)
        emb = timestep_embedding(x.flatten(), self.outdim)  # (B * D, outdim)
        return rearrange(emb, "(b d) c -> b (d c)", b=x.shape[0])  # (B, D * outdim)
