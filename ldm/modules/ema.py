"""Exponential moving average of a model's trainable parameters, in the original LitEma's layout.

The shadow weights are named as the parameters with the dots removed (`model_ema.diffusion_model...`
in SD checkpoints; the rule is `ldm.checkpoint.ema_buffer_name`), next to `decay` and
`num_updates`. On the weights' device they are buffers, as in the original. Kept on the CPU
(`device="cpu"`) they are plain tensors instead: `.to()`, `.half()` and DDP's buffer broadcast
do not see them, and only `state_dict` / `load_state_dict` carry them, under the same keys.
Under FSDP each rank keeps only its pieces of the shadow weights (`adopt_pieces`, by
`ldm.sharded_ema`), and a checkpoint's whole ones wait in `pending` to be cut into pieces.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ldm.checkpoint import ema_buffer_name
from ldm.util import ConfigError

# What FSDP and activation checkpointing insert into parameter names; the EMA's names are the
# module's own.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as the unwrapped module calls it."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name as the unwrapped model calls it: parameter} of `model`, wrapped or not."""
    return {unwrapped_name(name): p for name, p in model.named_parameters()}


def ema_options(ema_device: str | None, ema_update_every: int, ema_decay_rate: float) -> dict:
    """LitEma's `device`, `every` and `decay` from a model's `ema_device`, `ema_update_every`
    and `ema_decay_rate` params; checked with `use_ema: false` too."""
    if ema_device not in (None, "cpu"):
        raise ConfigError(f"ema_device {ema_device!r}: expected cpu, or null (the weights' device)")
    every, decay = ema_update_every, ema_decay_rate
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"ema_update_every {every!r}: expected an integer >= 1 (optimizer steps)")
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay <= 1:
        raise ConfigError(f"ema_decay_rate {decay!r}: expected a number in [0, 1], e.g. 0.9999")
    return {"device": ema_device, "every": every, "decay": float(decay)}


class LitEma(nn.Module):
    """EMA of `model`'s trainable parameters, with the original warm-up (1 + n) / (10 + n).

    Args:
        every: move the shadow weights every `every` optimizer steps, by the decay of all those
            steps (`interval_decay`), so the time constant in steps does not change.
        device: where the shadow weights live when not on the weights' device ("cpu"); they
            keep the dtype the weights had here (fp32) when the model is cast later.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        use_num_updates: bool = True,
        *,
        every: int = 1,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma: decay must be in [0, 1], got {decay}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"LitEma: every must be an integer >= 1, got {every!r}")
        self.every = every
        self.offload_device = None if device is None else torch.device(device)
        self.offloaded: dict[str, torch.Tensor] = {}  # the state, when kept off the model
        self.steps_without_warm_up = 0  # the step count when num_updates is -1 (not saved)
        self.m_name2s_name = {}
        self.keep("decay", torch.tensor(decay, dtype=torch.float32))
        start = 0 if use_num_updates else -1  # -1 turns the warm-up off
        self.keep("num_updates", torch.tensor(start, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.m_name2s_name[name] = ema_buffer_name(name)
                self.keep(self.m_name2s_name[name], p.detach())
        self.collected_params: list[torch.Tensor] = []
        self.pieces: dict[str, torch.Tensor] | None = None  # under FSDP: this rank's pieces
        self.pending: dict[str, torch.Tensor] = {}  # whole shadows loaded, not yet in pieces

    def keep(self, name: str, value: torch.Tensor) -> None:
        """A copy of `value` as the buffer `name`, or as a plain tensor on offload_device (one on
        the meta device stays there: a model built on meta to check keys allocates nothing)."""
        if self.offload_device is None:
            self.register_buffer(name, value.clone())
            return
        value = value if value.is_meta else value.to(self.offload_device, copy=True)
        self.offloaded[name] = value
        setattr(self, name, value)  # a plain attribute (no buffer): `.to()` leaves it alone

    def tensors(self) -> dict[str, torch.Tensor]:
        """{state-dict name: tensor}: decay, num_updates and the shadow weights (this rank's
        pieces of them under FSDP)."""
        kept = self.offloaded if self.offload_device is not None else dict(self.named_buffers())
        return kept if self.pieces is None else {**kept, **self.pieces}

    def release_shadows(self) -> dict[str, torch.Tensor]:
        """Take the whole shadow weights out ({name: tensor}), leaving decay and num_updates:
        before FSDP wraps the model, whose pieces `adopt_pieces` then takes."""
        shadows = {name: getattr(self, name) for name in self.m_name2s_name.values()}
        for name in shadows:
            self.offloaded.pop(name, None)
            delattr(self, name)
        self.pieces = {}
        return shadows

    def adopt_pieces(self, pieces: dict[str, torch.Tensor]) -> None:
        """This rank's pieces of the shadow weights, {name: 1-D tensor}, shaped as FSDP's local
        views of the parameters (on offload_device if set)."""
        device = self.offload_device
        self.pieces = {n: p if device is None else p.to(device) for n, p in pieces.items()}
        self.pending = {}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in self.offloaded.items():
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Copy into the offloaded tensors in place: they stay on their device, in their dtype.
        Under FSDP the whole shadow weights wait in `pending` (`ldm.sharded_ema` cuts them)."""
        if self.pieces is not None:
            state_dict = dict(state_dict)
            for name in self.m_name2s_name.values():
                if prefix + name in state_dict:
                    # .to: Lightning's lazily loaded tensors have no .detach or .clone
                    self.pending[name] = state_dict.pop(prefix + name).to("cpu", copy=True)
        for name, value in self.offloaded.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
            elif state_dict[key].shape != value.shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape "
                    f"{tuple(state_dict[key].shape)} from checkpoint, the shape in current "
                    f"model is {tuple(value.shape)}."
                )
            else:
                with torch.no_grad():
                    value.copy_(state_dict[key])
        ours = {prefix + name for name in self.offloaded}
        others = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(
            others, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors = self.tensors()
        params = named_parameters(model)
        names = list(self.m_name2s_name)
        return [params[n] for n in names], [tensors[self.m_name2s_name[n]] for n in names]

    def count_step(self) -> int:
        """One more optimizer step followed; num_updates counts them (it is saved, so a resumed
        run keeps the phase of `every`), or without the warm-up a count since construction."""
        if self.num_updates < 0:
            self.steps_without_warm_up += 1
            return self.steps_without_warm_up
        self.num_updates += 1
        return int(self.num_updates.item())

    def interval_decay(self, step: int) -> float:
        """The decay of the `every` steps up to `step`: the product of their per-step decays,
        decay ** every once the warm-up is over. The EMA is then the per-step one of weights
        held constant between updates, its time constant in steps is unchanged."""
        decay = self.decay.item()
        if self.num_updates < 0:
            return decay**self.every
        steps = range(step - self.every + 1, step + 1)
        return math.prod(min(decay, (1 + n) / (10 + n)) for n in steps)

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """Follow one optimizer step; every `every`-th moves the shadow weights to `model`'s."""
        step = self.count_step()
        if step % self.every:
            return
        weight = 1 - self.interval_decay(step)
        params, shadows = self._pairs(model)
        if self.offload_device is None:
            targets = [p.to(s.dtype) for p, s in zip(params, shadows, strict=True)]
            torch._foreach_lerp_(shadows, targets, weight)
            return
        for p, s in zip(params, shadows, strict=True):  # one tensor at a time on the host
            s.lerp_(p.detach().to(s.device, s.dtype), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into `model` (on its device, in its dtype)."""
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
        """Keep a copy of `parameters` to put back with `restore`, on offload_device if set (a
        CPU EMA puts no second copy of the weights on the GPU for validation either)."""
        self.collected_params = [
            p.detach().to(self.offload_device or p.device, copy=True) for p in parameters
        ]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        """Put back the parameters saved by `store`."""
        for saved, p in zip(self.collected_params, parameters, strict=True):
            p.copy_(saved)
        self.collected_params = []

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """`model` with the shadow weights inside the block, and its own put back after."""
        self.store(model.parameters())
        self.copy_to(model)
        try:
            yield
        finally:
            self.restore(model.parameters())
