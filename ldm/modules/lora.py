"""LoRA adapters (Hu et al. 2021) for the UNet and the text encoder, named as kohya names them.

An adapter sits beside the layer it adapts: a forward hook adds
`multiplier * alpha / rank * lora_up(lora_down(dropout(x)))` to the layer's output. The base
model keeps every module and state-dict key of the original SD layout (which peft's wrapping,
`to_q.base_layer.weight`, would rename), and the adapters' own keys are those of the files
kohya sd-scripts writes and AUTOMATIC1111, ComfyUI and diffusers' `load_lora_weights` read:
`lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`, `.lora_up.weight`, `.alpha`,
with the UNet's modules under their diffusers names and the text encoder's under
transformers'. Convolutions get LoCon adapters: a k x k `lora_down`, a 1 x 1 `lora_up`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ldm.util import ConfigError

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
# The layers each target name adapts, by their original module path.
UNET_TARGETS = {
    "attn": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "ff": r"\.ff\.net\.(0\.proj|2)$",
    "proj": r"\.(proj_in|proj_out)$",
    "conv": r"\.(in_layers\.2|out_layers\.3|skip_connection|op|conv)$",  # LoCon
}
TEXT_ENCODER_TARGETS = {
    "attn": r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    "mlp": r"\.mlp\.(fc1|fc2)$",
}
ADAPTABLE = (nn.Linear, nn.Conv2d)
FILE_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class LoRAModule(nn.Module):
    """A rank-`rank` update of one Linear or Conv2d layer (or of one projection of an
    nn.MultiheadAttention, `AttentionSlot`); `lora_up` starts at zero."""

    def __init__(self, layer, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            conv = {"kernel_size": layer.kernel_size, "stride": layer.stride}
            conv["padding"] = layer.padding
            self.lora_down = nn.Conv2d(layer.in_channels, rank, bias=False, **conv)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dropout = nn.Dropout(dropout)
        self.rank = rank
        self.multiplier = 1.0

    def scale(self) -> Tensor:
        return self.alpha * (self.multiplier / self.rank)  # a tensor: no device sync

    def forward(self, x: Tensor) -> Tensor:
        """The update to add to the layer's output for its input x."""
        return self.lora_up(self.lora_down(self.dropout(x))) * self.scale()

    def weight_delta(self) -> Tensor:
        """The update as a change of the layer's weight: up @ down, scaled."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if down.ndim == 2:
            return up @ down * self.scale()  # (out, in)
        return torch.einsum("or,rikl->oikl", up.flatten(1), down) * self.scale()  # (out, in, k, k)


class AttentionSlot:
    """The q, k, v or out projection of an nn.MultiheadAttention (open_clip's text tower), whose
    q, k and v live stacked in one `in_proj_weight`: what an adapter of it updates."""

    PARTS = ("q", "k", "v", "out")

    def __init__(self, attention: nn.MultiheadAttention, part: str):
        self.attention, self.part = attention, part
        self.in_features = self.out_features = attention.embed_dim

    @property
    def weight(self) -> Tensor:
        """The projection's (D, D) weight, a view into the attention's parameters."""
        if self.part == "out":
            return self.attention.out_proj.weight
        d, i = self.attention.embed_dim, self.PARTS.index(self.part)
        return self.attention.in_proj_weight[i * d : (i + 1) * d]

    def attach(self, adapter: LoRAModule) -> None:
        if not isinstance(self.attention, LoRAMultiheadAttention):
            self.attention.__class__ = LoRAMultiheadAttention  # same parameters and keys
            self.attention.lora_adapters = {}
        self.attention.lora_adapters[self.part] = adapter

    def detach(self) -> None:
        adapters = getattr(self.attention, "lora_adapters", {})
        adapters.pop(self.part, None)
        if not adapters and isinstance(self.attention, LoRAMultiheadAttention):
            self.attention.__class__ = nn.MultiheadAttention


class LoRAMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose projections carry their adapters' weight updates (q, k, v
    cannot be reached by a hook: they are computed inside the fused attention)."""

    lora_adapters: dict[str, LoRAModule]

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, **options):
        d = self.embed_dim
        zero = self.in_proj_weight.new_zeros(d, d)
        adapters = self.lora_adapters
        deltas = [adapters[p].weight_delta() if p in adapters else zero for p in "qkv"]
        in_proj = self.in_proj_weight + torch.cat(deltas).to(self.in_proj_weight.dtype)
        out = adapters.get("out")
        out_proj = self.out_proj.weight + (0 if out is None else out.weight_delta())
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        output, weights = nn.functional.multi_head_attention_forward(
            query,
            key,
            value,
            d,
            self.num_heads,
            in_proj,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_proj.to(in_proj.dtype),
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            **options,
        )
        return (output.transpose(0, 1) if self.batch_first else output), weights


class LoRANetwork(nn.ModuleDict):
    """The adapters of one model by kohya name, and the layers they adapt.

    Its state dict is a kohya LoRA file's (`<name>.lora_down.weight`, ...). `attach` hooks the
    adapters into their layers (training, sampling a run); `merge` writes them into the
    layers' weights instead (exports, the scripts' --lora files).
    """

    def __init__(
        self,
        adapters: Mapping[str, LoRAModule] | None = None,
        layers: Mapping[str, nn.Module | AttentionSlot] | None = None,
    ):
        super().__init__(adapters)
        self.layers: dict = {}  # not submodules: they keep their own keys
        if layers is not None:
            self.layers = {name: layers[name] for name in self}
        self.handles: list = []

    def attach(self, layers: Mapping[str, nn.Module | AttentionSlot] | None = None) -> LoRANetwork:
        """Add each adapter's update to the output of its layer (`layers[name]`, or the layers
        the network was built with) from now on."""
        if layers is not None:
            self.layers = {name: layers[name] for name in self}
        for name, adapter in self.items():
            layer = self.layers[name]
            if isinstance(layer, AttentionSlot):
                layer.attach(adapter)
                self.handles.append(layer)
            else:
                self.handles.append(layer.register_forward_hook(_adding(adapter)))
        return self

    def detach_hooks(self) -> None:
        for handle in self.handles:
            handle.detach() if isinstance(handle, AttentionSlot) else handle.remove()
        self.handles.clear()

    @torch.no_grad()
    def merge(self, multiplier: float = 1.0) -> None:
        """Add `multiplier` x the adapters' updates to their layers' weights, hooks removed."""
        self.detach_hooks()
        for name, adapter in self.items():
            weight = self.layers[name].weight
            weight += (multiplier * adapter.weight_delta()).to(weight.dtype).view_as(weight)


def _adding(adapter: LoRAModule):
    def hook(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + adapter(args[0]).to(output.dtype)

    return hook


def kohya_name(prefix: str, module_path: str) -> str:
    """`lora_unet_down_blocks_0_attentions_0_proj_in` for `down_blocks.0.attentions.0.proj_in`."""
    return prefix + module_path.replace(".", "_")


def targets_of(names: Iterable[str], table: Mapping[str, str], where: str) -> re.Pattern:
    """One pattern matching the module paths of the named targets."""
    unknown = sorted(set(names) - set(table))
    if unknown or not names:
        raise ConfigError(f"{where}.targets {list(names)}: expected some of {sorted(table)}")
    return re.compile("|".join(f"(?:{table[name]})" for name in names))


def adaptable_layers(
    root: nn.Module, pattern: re.Pattern, rename: Mapping[str, str] | None, prefix: str
) -> dict[str, nn.Module]:
    """{kohya name: layer} of the Linear / Conv2d layers under `root` whose original path
    matches `pattern`; `rename` maps original module paths to the names files use."""
    layers = {}
    for path, module in root.named_modules():
        if isinstance(module, ADAPTABLE) and pattern.search("." + path):
            layers[kohya_name(prefix, rename[path] if rename is not None else path)] = module
    return layers
