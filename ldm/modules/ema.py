"""Exponential moving average of a model's trainable parameters, stored as buffers.

The buffer names are the parameter names with the dots removed (`model_ema.diffusion_model...`
in SD checkpoints; the rule is `ldm.checkpoint.ema_buffer_name`), plus `decay` and
`num_updates`, as in the original LitEma.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.checkpoint import ema_buffer_name


class LitEma(nn.Module):
    """EMA of `model`'s trainable parameters, with the original warm-up (1 + n) / (10 + n)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma: decay must be in [0, 1], got {decay}")
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        start = 0 if use_num_updates else -1  # -1 turns the warm-up off
        self.register_buffer("num_updates", torch.tensor(start, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.m_name2s_name[name] = ema_buffer_name(name)
                self.register_buffer(self.m_name2s_name[name], p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        buffers = dict(self.named_buffers())
        params = dict(model.named_parameters())
        names = list(self.m_name2s_name)
        return [params[n] for n in names], [buffers[self.m_name2s_name[n]] for n in names]

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """Move the shadow weights one step towards `model`'s."""
        decay = self.decay.item()
        if self.num_updates >= 0:
            self.num_updates += 1
            n = self.num_updates.item()
            decay = min(decay, (1 + n) / (10 + n))
        params, shadows = self._pairs(model)
        torch._foreach_lerp_(
            shadows, [p.to(s.dtype) for p, s in zip(params, shadows, strict=True)], 1 - decay
        )

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into `model`."""
        params, shadows = self._pairs(model)
        for p, s in zip(params, shadows, strict=True):
            p.copy_(s)

    @torch.no_grad()
    def reset_from(self, model: nn.Module) -> None:
        """Set the shadow weights to `model`'s and restart the warm-up."""
        params, shadows = self._pairs(model)
        for p, s in zip(params, shadows, strict=True):
            s.copy_(p)
        self.num_updates.clamp_(max=0)

    def store(self, parameters) -> None:
        """Keep a copy of `parameters` to put back with `restore`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        """Put back the parameters saved by `store`."""
        for saved, p in zip(self.collected_params, parameters, strict=True):
            p.copy_(saved)
        self.collected_params = []
