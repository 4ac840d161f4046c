"""SDXL's conditioner: embedders of batch entries whose outputs, by their number of dims,
become the UNet's cross-attention context, its label vector or extra input channels.

generative-models' `GeneralConditioner` (Podell et al. 2023), with its config keys and the
`conditioner.embedders.{i}.*` state-dict keys of SDXL files. Each embedder reads `input_key`
(or `input_keys`) of the batch; its outputs are concatenated with the other embedders' of the
same kind: `vector` (B, D) along D, `crossattn` (B, L, D) along D, `concat` (B, C, H, W)
along C. An embedder is frozen unless `is_trainable`, and `ucg_rate` zeroes its outputs for
that share of the training batch (guidance dropout; `legacy_ucg_value` replaces the input
instead, e.g. a caption by "").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ldm.util import batch_item, instantiate_from_config, to_plain

# An output's kind by its number of dims, and the dim that kind concatenates along.
OUTPUT_KINDS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
CAT_DIMS = {"vector": 1, "crossattn": 2, "concat": 1}
# The keys of an embedder's config that the conditioner reads (beside target and params).
SPEC_KEYS = ("is_trainable", "ucg_rate", "input_key", "input_keys", "legacy_ucg_value")


@dataclass(frozen=True)
class EmbedderSpec:
    """How the conditioner feeds and treats one embedder."""

    input_keys: tuple[str, ...]
    is_trainable: bool = False
    ucg_rate: float = 0.0
    legacy_ucg_value: Any = None  # the input's stand-in under dropout; None zeroes the output


def embedder_spec(index: int, config: Mapping) -> EmbedderSpec:
    """The EmbedderSpec of `emb_models[index]`, checked, with an error naming the entry."""
    where = f"GeneralConditioner: emb_models[{index}] ({config.get('target')!r})"
    keys = config.get("input_keys", [config["input_key"]] if "input_key" in config else None)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{where} needs an input_key (or input_keys): the batch entry it reads")
    rate = config.get("ucg_rate", 0.0)
    if not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{where}: ucg_rate must be a number in [0, 1], got {rate!r}")
    value = config.get("legacy_ucg_value")
    if value is not None and len(keys) != 1:
        raise ValueError(f"{where}: legacy_ucg_value replaces one input; it has {list(keys)}")
    return EmbedderSpec(tuple(keys), bool(config.get("is_trainable", False)), float(rate), value)


def build_embedder(index: int, config: Mapping, spec: EmbedderSpec) -> nn.Module:
    """The embedder of `config`, frozen unless trainable (and then refused if it froze itself)."""
    embedder = instantiate_from_config({k: v for k, v in config.items() if k not in SPEC_KEYS})
    params = list(embedder.parameters())
    if not spec.is_trainable:
        embedder.requires_grad_(False).eval()
    elif params and not any(p.requires_grad for p in params):
        raise ValueError(
            f"GeneralConditioner: emb_models[{index}] ({config['target']!r}) is_trainable, but "
            "the embedder froze its parameters; pass freeze: false in its params"
        )
    return embedder


def dropout_mask(batch: int, rate: float, device: torch.device) -> torch.Tensor:
    """(B,) of 1 (kept) and 0 (dropped, with probability `rate`)."""
    return torch.bernoulli(torch.full((batch,), 1.0 - rate, device=device))


class GeneralConditioner(nn.Module):
    """`forward(batch) -> {"crossattn": (B, L, D), "vector": (B, D), "concat": ...}` of the
    kinds its embedders make. One dropout draw per embedder and sample zeroes all of that
    embedder's outputs together (a dropped caption loses its context and its pooled vector;
    generative-models draws each output on its own), in training mode only."""

    def __init__(self, emb_models: Sequence[Mapping]):
        super().__init__()
        configs = [dict(to_plain(c)) for c in emb_models]
        self.specs = [embedder_spec(i, c) for i, c in enumerate(configs)]
        self.embedders = nn.ModuleList(
            build_embedder(i, c, s)
            for i, (c, s) in enumerate(zip(configs, self.specs, strict=True))
        )
        self.adapted: set[int] = set()  # frozen embedders with LoRA adapters: run with gradients

    def text_embedders(self) -> list[int]:
        """Indices of the embedders that read captions (`txt` or `caption`)."""
        return [i for i, s in enumerate(self.specs) if {"txt", "caption"} & set(s.input_keys)]

    def train(self, mode: bool = True) -> GeneralConditioner:
        """As nn.Module.train, except that frozen embedders stay in eval mode."""
        super().train(mode)
        for embedder, spec in zip(self.embedders, self.specs, strict=True):
            if not spec.is_trainable:
                embedder.eval()
        return self

    def forward(
        self,
        batch: Mapping,
        force_zero_embeddings: Iterable[str] = (),
        dropout: bool | None = None,
        kept: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The conditioning of `batch`; embedders reading a key in `force_zero_embeddings` give
        zeros (SDXL's unconditional text); `dropout` (default: training mode) applies ucg_rate;
        `kept` maps a batch key to a (B,) mask of the items whose embeddings of it are kept (0:
        zeroed, for every embedder reading it at once)."""
        dropout = self.training if dropout is None else dropout
        return self.assemble(self.embed(batch, dropout), force_zero_embeddings, dropout, kept)

    def embed(self, batch: Mapping, dropout: bool = False) -> list[list[torch.Tensor]]:
        """Each embedder's outputs for `batch`, as they are (a latent cache stores these);
        with `dropout`, legacy_ucg_value first replaces some inputs."""
        embedded = []
        for index, (embedder, spec) in enumerate(zip(self.embedders, self.specs, strict=True)):
            inputs = [batch_item(batch, key) for key in spec.input_keys]
            if dropout and spec.legacy_ucg_value is not None:
                inputs = [self.replaced(inputs[0], spec)]
            grad = nullcontext() if spec.is_trainable or index in self.adapted else torch.no_grad()
            with grad:
                outputs = embedder(*inputs)
            embedded.append(list(outputs) if isinstance(outputs, list | tuple) else [outputs])
        return embedded

    def assemble(
        self,
        embedded: list[list[torch.Tensor]],
        force_zero_embeddings: Iterable[str] = (),
        dropout: bool = False,
        kept: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The embedders' outputs (`embed`'s, or a cache's) joined by kind, with guidance
        dropout, `kept` masks and zeroed inputs applied (see forward)."""
        zeroed, kept = set(force_zero_embeddings), kept or {}
        output: dict[str, torch.Tensor] = {}
        for index, (spec, outputs) in enumerate(zip(self.specs, embedded, strict=True)):
            keep = None
            if dropout and spec.ucg_rate > 0 and spec.legacy_ucg_value is None:
                keep = dropout_mask(len(outputs[0]), spec.ucg_rate, outputs[0].device)
            for key in set(spec.input_keys) & set(kept):
                mask = kept[key].to(outputs[0].device, torch.float)
                keep = mask if keep is None else keep * mask
            for emb in outputs:
                kind = self.kind(index, emb)
                if keep is not None:
                    emb = emb * keep.view(-1, *[1] * (emb.ndim - 1)).to(emb.dtype)
                if zeroed & set(spec.input_keys):
                    emb = torch.zeros_like(emb)
                output[kind] = self.joined(output.get(kind), emb, kind, index)
        return output

    def kind(self, index: int, emb: torch.Tensor) -> str:
        if not isinstance(emb, torch.Tensor) or emb.ndim not in OUTPUT_KINDS:
            got = f"shape {tuple(emb.shape)}" if isinstance(emb, torch.Tensor) else type(emb)
            raise ValueError(
                f"GeneralConditioner: embedder {index} ({type(self.embedders[index]).__name__}) "
                f"gave {got}; outputs must be tensors of 2 (vector), 3 (crossattn) or 4-5 "
                "(concat) dims"
            )
        return OUTPUT_KINDS[emb.ndim]

    def joined(
        self, before: torch.Tensor | None, emb: torch.Tensor, kind: str, index: int
    ) -> torch.Tensor:
        if before is None:
            return emb
        dim = CAT_DIMS[kind]
        if before.shape[:dim] != emb.shape[:dim] or before.shape[dim + 1 :] != emb.shape[dim + 1 :]:
            raise ValueError(
                f"GeneralConditioner: embedder {index} ({type(self.embedders[index]).__name__}) "
                f"gave {kind} {tuple(emb.shape)}, which cannot join the earlier embedders' "
                f"{tuple(before.shape)} along dim {dim}"
            )
        return torch.cat([before, emb], dim=dim)

    def replaced(self, values: Sequence, spec: EmbedderSpec) -> list:
        """`values` with each item replaced by legacy_ucg_value with probability ucg_rate."""
        drop = torch.rand(len(values)) < spec.ucg_rate
        return [
            spec.legacy_ucg_value if d else v for v, d in zip(values, drop.tolist(), strict=True)
        ]

    def get_unconditional_conditioning(
        self,
        batch_c: Mapping,
        batch_uc: Mapping | None = None,
        force_uc_zero_embeddings: Iterable[str] | None = None,
        force_cond_zero_embeddings: Iterable[str] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(conditional, unconditional) conditionings, without dropout, as generative-models'."""
        c = self(batch_c, force_cond_zero_embeddings or (), dropout=False)
        uc_batch = batch_c if batch_uc is None else batch_uc
        return c, self(uc_batch, force_uc_zero_embeddings or (), dropout=False)
